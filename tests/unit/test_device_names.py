"""Nothing outside gpumagic/backends/ branches on a device name, read from the source.

A comparison or membership test (``==``, ``!=``, ``in``, ``not in``) with "cuda", "mps", "cpu" or
"xpu" as an operand, or inside a literal tuple, list or set that is one, is a branch on a device
name: that decision belongs to a backend (``gpumagic/backends/``, the ``Backend`` protocol).

gpumagic/oom/ is left out: it reads error messages from any framework, and its device words
("hip", "xpu", TensorFlow's "gpu") are the messages' vocabulary, most with no backend here.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gpumagic import backends

PACKAGE = Path(__file__).resolve().parents[2] / "gpumagic"
DEVICE_NAMES = {"cuda", "mps", "cpu", "xpu"}
EXEMPT = ("backends", "oom")
BRANCHING = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)


def _names_in(node: ast.expr) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value} & DEVICE_NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {n for e in node.elts for n in _names_in(e)}
    return set()


def branches_on_device_names(source: str, filename: str) -> list[str]:
    """'file:line: "cuda"' for each comparison in ``source`` that tests a device name."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Compare) and any(isinstance(op, BRANCHING) for op in node.ops):
            names = set().union(*(_names_in(e) for e in (node.left, *node.comparators)))
            if names:
                found.append((node.lineno, f"{filename}:{node.lineno}: {', '.join(repr(n) for n in sorted(names))}"))
    return [text for _, text in sorted(found)]


def _checked_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in EXEMPT)


def test_no_module_outside_the_backends_branches_on_a_device_name() -> None:
    found = [hit for p in _checked_modules()
             for hit in branches_on_device_names(p.read_text(), str(p.relative_to(PACKAGE.parent)))]
    assert found == []


def test_the_check_reads_every_core_and_edge_module() -> None:
    names = {p.relative_to(PACKAGE).as_posix() for p in _checked_modules()}
    assert {"dryrun.py", "magics.py", "distributed.py", "devices.py", "tracking.py"} <= names
    assert not any(n.startswith(("backends/", "oom/")) for n in names)


def test_the_check_finds_each_kind_of_branch() -> None:
    code = (
        'if kind == "cuda": pass\n'
        'if "mps" != kind: pass\n'
        'if kind in ("cpu", "meta"): pass\n'
        'if kind not in {"xpu"}: pass\n'
        'x = "cuda" if a < b else kind\n'          # no branch on the name
        'torch.device("cpu")\n'                   # a name used, not tested
        'if kind == "hip": pass\n'                # not one of the names
    )
    assert branches_on_device_names(code, "m.py") == [
        "m.py:1: 'cuda'", "m.py:2: 'mps'", "m.py:3: 'cpu'", "m.py:4: 'xpu'",
    ]


# --- what the backends answer in place of the names ------------------------------------------------


def test_an_oom_message_names_its_device_through_the_backends() -> None:
    from gpumagic.magics import OOMPresenter

    def info(device_type: str, index: int | None = None) -> SimpleNamespace:
        return SimpleNamespace(device_type=device_type, device_index=index, simulated=False)

    assert OOMPresenter._measure_options(info("cuda", 1)) == "-d cuda:1"
    assert OOMPresenter._measure_options(info("mps", 0)) == "-d mps"
    assert OOMPresenter._measure_options(info("hip", 0)) == ""  # no backend claims it
    assert OOMPresenter._device(info("cpu")) == torch.device("cpu")


def test_a_plan_takes_a_catalog_gpu_only_where_a_backend_accepts_one() -> None:
    from gpumagic.dryrun import plan_target

    assert plan_target(None, "T4", None)[0] == "cuda"
    with pytest.raises(ValueError, match="gpu T4 plans for cuda; the device given is 'mps'"):
        plan_target("mps", "T4", None)
    with pytest.raises(ValueError, match=r"device must be .*'cuda:N'.*, got 'tpu'"):
        plan_target("tpu", None, None)


def _target(name: str) -> backends.DryRunTarget:
    backend = backends.get(name)
    target = None if backend is None else backends.dry_run_target(backend)
    assert target is not None
    return target


def test_each_builtin_backend_says_how_a_dry_run_plans_for_it() -> None:
    cuda, mps, cpu = _target("cuda"), _target("mps"), _target("cpu")
    assert (cuda.host, cuda.caching_allocator, cuda.named_gpu, cuda.foreach_optimizers) == (False, True, True, True)
    assert cuda.stands_in() is not torch.cuda.is_available()
    assert (mps.host, mps.caching_allocator, mps.stands_in(), mps.moves_from) == (False, False, True, ("cuda",))
    assert (cpu.host, cpu.caching_allocator, cpu.stands_in()) == (True, False, False)
