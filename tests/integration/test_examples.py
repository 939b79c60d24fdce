"""The example notebooks run top to bottom in a real kernel and show what their text says.

Each notebook is executed once per session with nbclient, in a kernel of this interpreter (a
temporary kernelspec, so a personal ``python3`` kernelspec cannot point the run elsewhere), in a
throwaway working folder. Cells tagged ``raises-exception`` are the intended out-of-memory errors.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Callable, Iterator
from html import unescape
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat import NotebookNode

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOTEBOOKS = sorted(p.name for p in EXAMPLES.glob("*.ipynb"))
KERNEL = "gpumagic-examples"
CELL_TIMEOUT = 300
RAISES = "raises-exception"
WIDGET = "application/vnd.jupyter.widget-view+json"
COLAB = "https://colab.research.google.com/github/gpumagic/gpumagic/blob/main/examples/05_colab_gpu.ipynb"


def test_the_examples_are_there() -> None:
    assert NOTEBOOKS == [
        "01_quickstart.ipynb",
        "02_oom_advice.ipynb",
        "03_effective_batch.ipynb",
        "04_loader_built_earlier.ipynb",
        "05_colab_gpu.ipynb",
        "06_plan_for_a_gpu.ipynb",
        "07_which_batch_size.ipynb",
    ]


# --- committed files --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name: str) -> None:
    nb = nbformat.read(EXAMPLES / name, as_version=4)

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert [(c.execution_count, c.outputs) for c in code] == [(None, [])] * len(code)
    assert "widgets" not in nb.metadata


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_what_the_generator_writes(name: str) -> None:
    spec = importlib.util.spec_from_file_location("make_notebooks", EXAMPLES / "make_notebooks.py")
    assert spec is not None
    assert spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)

    committed = json.loads((EXAMPLES / name).read_text(encoding="utf-8"))

    assert committed == json.loads(nbformat.writes(generator.NOTEBOOKS[name])), "run examples/make_notebooks.py"


def test_colab_notebook_has_the_badge_and_a_guarded_install() -> None:
    nb = nbformat.read(EXAMPLES / "05_colab_gpu.ipynb", as_version=4)
    install = next(c for c in nb.cells if "%pip install" in c.source)

    assert f"]({COLAB})" in nb.cells[0].source
    assert 'if "google.colab" in sys.modules:' in install.source


# --- executed ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A kernelspec for this interpreter, found first through JUPYTER_PATH."""
    data = tmp_path_factory.mktemp("jupyter-path")
    spec = data / "kernels" / KERNEL / "kernel.json"
    spec.parent.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.write_text(json.dumps({"argv": argv, "display_name": "gpumagic examples", "language": "python"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(data))
        yield KERNEL


@pytest.fixture(scope="module")
def executed(kernel_name: str, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], NotebookNode]:
    """``executed(name)``: the notebook after a run; each notebook runs once, a failure is kept and re-raised."""
    done: dict[str, NotebookNode | Exception] = {}

    def run(name: str) -> NotebookNode:
        if name not in done:
            nb = nbformat.read(EXAMPLES / name, as_version=4)
            cwd = tmp_path_factory.mktemp(name.removesuffix(".ipynb"))
            client = NotebookClient(
                nb, kernel_name=kernel_name, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(cwd)}}
            )
            try:
                client.execute()
                done[name] = nb
            except Exception as e:  # every test of this notebook reports the same failure
                done[name] = e
        result = done[name]
        if isinstance(result, Exception):
            raise result
        return result

    return run


def code_cells(nb: NotebookNode) -> list[NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def tagged(cell: NotebookNode) -> bool:
    return RAISES in cell.metadata.get("tags", [])


def html(output: NotebookNode) -> str:
    return unescape(str(output.get("data", {}).get("text/html", "")))


def errors(cell: NotebookNode) -> list[NotebookNode]:
    return [o for o in cell.outputs if o.output_type == "error"]


def text_of(nb: NotebookNode) -> str:
    """Everything printed or shown as text, in order."""
    parts = []
    for cell in code_cells(nb):
        for o in cell.outputs:
            if o.output_type == "stream":
                parts.append(o.text)
            elif "data" in o:
                parts.append(str(o.data.get("text/plain", "")))
    return "\n".join(parts)


def cell_with(nb: NotebookNode, needle: str) -> NotebookNode:
    found = [c for c in code_cells(nb) if needle in c.source]
    assert len(found) == 1, f"{len(found)} cells contain {needle!r}"
    return found[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_with_errors_only_in_tagged_cells(executed: Callable[[str], NotebookNode], name: str) -> None:
    nb = executed(name)

    failed = [c.source.splitlines()[0] for c in code_cells(nb) if errors(c) and not tagged(c)]
    assert not failed
    assert all(c.execution_count is not None for c in code_cells(nb))


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_gpumem_cell_shows_the_report(executed: Callable[[str], NotebookNode], name: str) -> None:
    cells = [c for c in code_cells(executed(name)) if c.source.startswith("%%gpumem") and not tagged(c)]

    assert cells
    for cell in cells:
        title = "gpumagic memory plan (dry run)" if "--dry-run" in cell.source else "gpumagic memory report"
        assert any(title in html(o) for o in cell.outputs), cell.source.splitlines()[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_find_batch_cell_shows_the_widget_and_a_png(executed: Callable[[str], NotebookNode], name: str) -> None:
    nb = executed(name)
    cells = [c for c in code_cells(nb) if "%find_batch" in c.source and " -q" not in c.source]

    assert cells
    for cell in cells:
        # the result's own bundle: tqdm's progress bar is a widget too, in an output of its own
        title = "gpumagic batch-size plan (dry run)" if "--dry-run" in cell.source else "gpumagic batch-size search"
        bundles = [o.data for o in cell.outputs if title in html(o)]
        assert len(bundles) == 1, cell.source
        assert WIDGET in bundles[0]
        assert "image/png" in bundles[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_warnings_are_printed(executed: Callable[[str], NotebookNode], name: str) -> None:
    stderr = [o.text for c in code_cells(executed(name)) for o in c.outputs if o.get("name") == "stderr"]

    assert not [t for t in stderr if "Warning" in t]


@pytest.mark.slow
def test_oom_cell_shows_the_advice_and_a_short_error(executed: Callable[[str], NotebookNode]) -> None:
    cell = next(c for c in code_cells(executed("02_oom_advice.ipynb")) if tagged(c))

    (error,) = errors(cell)
    advice = [html(o) for o in cell.outputs if "gpumagic-oom" in html(o)]
    assert error.ename == "OutOfMemoryError"
    assert len(advice) == 1
    assert "Measure the batch size that fits" in advice[0]
    assert "%find_batch --var batch_size -d cpu --budget 24MiB" in advice[0]
    assert "accumulation" in advice[0]
    assert "(full traceback: %tb)" in "\n".join(error.traceback)


@pytest.mark.slow
def test_oom_notebook_returns_tensor_memory_to_the_baseline(executed: Callable[[str], NotebookNode]) -> None:
    nb = executed("02_oom_advice.ipynb")

    held = re.search(r"still held by 'x'", "\n".join(html(o) for c in code_cells(nb) for o in c.outputs))
    difference = re.search(r"difference (-?\d+) bytes", text_of(nb))
    assert held, "the batch the failed loop bound to x is kept (gpumagic never deletes a value) and shown"
    assert "True True" in text_of(nb)  # x and y are still there after the error
    assert difference
    assert int(difference.group(1)) == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "claim"),
    [
        ("01_quickstart.ipynb", "batch_size is still 64"),
        ("04_loader_built_earlier.ipynb", "train_loader.batch_size is still 32"),
        ("04_loader_built_earlier.ipynb", "weights unchanged: True"),
        ("04_loader_built_earlier.ipynb", "GradScaler scale unchanged: True"),
        ("03_effective_batch.ipynb", "recommended batch size 256 for a data set of 256 samples"),
        ("03_effective_batch.ipynb", "batch 512 makes 16× fewer steps"),
        ("07_which_batch_size.ipynb", "batch_size is still 64"),
        ("07_which_batch_size.ipynb", "weights unchanged: True"),
    ],
)
def test_notebook_prints_what_its_text_claims(executed: Callable[[str], NotebookNode], name: str, claim: str) -> None:
    assert claim in text_of(executed(name))


@pytest.mark.slow
def test_effective_batch_notebook_reaches_the_effective_batch_with_accumulation(
    executed: Callable[[str], NotebookNode],
) -> None:
    nb = executed("03_effective_batch.ipynb")
    text = text_of(nb)

    plan = re.search(r"micro-batch (\d+) × (\d+) accumulation steps = (\d+)", text)
    single = re.search(r"one batch of 2048 would need about ([\d.]+) MiB of the 16 MiB", text)
    report = cell_with(nb, "train_epoch(model, opt, micro, accumulation=accumulation)").outputs
    assert plan
    micro, steps, effective = map(int, plan.groups())
    assert micro * steps == effective >= 2048
    assert steps > 1
    assert single
    assert float(single.group(1)) > 16, "the notebook says one batch of 2048 does not fit"
    assert any("· 2 steps" in str(o.get("data", {}).get("text/plain", "")) for o in report)


@pytest.mark.slow
def test_colab_notebook_skips_gpu_only_cells_without_a_gpu(executed: Callable[[str], NotebookNode]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU the GPU-only cells run")
    nb = executed("05_colab_gpu.ipynb")

    gpu_only = [c for c in code_cells(nb) if c.source.startswith("if not torch.cuda.is_available():")]
    assert len(gpu_only) == 3
    for cell in gpu_only:
        assert [(o.output_type, o.get("text")) for o in cell.outputs] == [("stream", "no GPU: skipped\n")]


@pytest.mark.slow
@pytest.mark.gpu
def test_colab_notebook_shows_a_real_oom_on_a_gpu(executed: Callable[[str], NotebookNode]) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (MPS is not what this notebook targets)")
    nb = executed("05_colab_gpu.ipynb")
    cell = next(c for c in code_cells(nb) if tagged(c))

    (error,) = errors(cell)
    assert "OutOfMemoryError" in error.ename
    assert any("gpumagic-oom" in html(o) for o in cell.outputs)


@pytest.mark.slow
def test_plan_notebook_picks_a_batch_for_each_gpu_and_leaves_the_namespace(
    executed: Callable[[str], NotebookNode],
) -> None:
    nb = executed("06_plan_for_a_gpu.ipynb")
    text = text_of(nb)
    picks = re.findall(r"^(T4|A100-80GB): batch (\d+) of 512 tokens, planned peak", text, re.MULTILINE)

    assert len(picks) == 2
    assert 0 < int(picks[0][1]) < int(picks[1][1])
    assert "False False" in text  # the planned cell's model and optimizer are not left behind
    m = re.search(r"planned .+, measured .+ \(([+-][0-9.]+)%\)", text)
    assert m is not None
    assert abs(float(m.group(1))) <= 3.0


@pytest.mark.slow
def test_sweep_notebook_shows_three_sizes_the_noise_scale_and_a_pick(executed: Callable[[str], NotebookNode]) -> None:
    nb = executed("07_which_batch_size.ipynb")
    shown = [o.data for o in cell_with(nb, "res = _").outputs if "data" in o]
    assert len(shown) == 1
    assert "gpumagic batch-size sweep" in html(cell_with(nb, "res = _").outputs[0])
    assert WIDGET in shown[0]
    assert "image/png" in shown[0]
    text = text_of(nb)
    assert re.search(r"recommended batch size (16|64|256): batch \d+ reached the best accuracy", text)
    assert re.search(r"noise scale [\d,]+ \(10-90%: [\d,]+-[\d,]+\)", text)
    runs = re.findall(r"batch (\d+): (\d+) samples, lr ([\d.]+), accuracy", text)
    assert [(b, float(lr)) for b, _, lr in runs] == [("16", 0.0125), ("64", 0.05), ("256", 0.2)]
    assert all(int(n) == 4096 for _, n, _ in runs)
