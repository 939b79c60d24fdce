"""Data-parallel jobs on CPU (gloo): per-rank reports and a batch-size search agreed by the ranks.

Each test starts real rank processes (tests/ddp_worker.py) and waits with a timeout, so a
deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = WORKER.parent.parent
TIMEOUT_S = 150
# every test below that starts rank processes takes 10-80 s on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(scenario: str, budgets: list[str], tmp_path: Path, device: str = "cpu") -> list[dict[str, Any]]:
    world = len(budgets)
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), GPUMAGIC_TEST_BUDGETS=",".join(budgets), OMP_NUM_THREADS="1",
                   GPUMAGIC_TEST_DEVICE=device,
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for r in range(world):
        path = tmp_path / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote nothing:\n" + "\n".join(logs)
        results.append(json.loads(path.read_text()))
    return results


@pytest.mark.slow
def test_track_gathers_every_rank_into_the_report(tmp_path: Path) -> None:
    ranks = _run("track_mlp", ["64MiB", "64MiB"], tmp_path)
    for got in ranks:
        rep = got["report"]
        assert rep["world_size"] == 2
        assert [r["rank"] for r in rep["ranks"]] == [0, 1]
        assert all(r["steps"] == 3 for r in rep["ranks"])
    # rank 1 trains at twice rank 0's batch: its peak is the higher one, and the report says so
    peaks = [r["peak_bytes"] for r in ranks[0]["report"]["ranks"]]
    assert peaks[1] > peaks[0]
    assert "rank 1 peaks highest" in ranks[0]["text"]


@pytest.mark.slow
def test_ranks_agree_on_one_result_for_a_ddp_mlp_and_training_goes_on(tmp_path: Path) -> None:
    ranks = _run("find_mlp", ["24MiB", "24MiB"], tmp_path)
    assert all("error" not in r for r in ranks), ranks
    results = [r["result"] for r in ranks]
    assert results[0]["trials"] == results[1]["trials"]
    assert results[0]["max_batch_size"] == results[1]["max_batch_size"] > 1
    assert results[0]["world_size"] == 2
    assert ranks[0]["global_batch_size"] == 2 * results[0]["recommended_batch_size"]
    assert all(r["restored"] and r["trained_after"] and r["grads_equal_across_ranks"] for r in ranks)


@pytest.mark.slow
def test_ranks_agree_for_a_ddp_cnn_with_batchnorm(tmp_path: Path) -> None:
    ranks = _run("find_cnn", ["40MiB", "40MiB"], tmp_path)
    assert all("error" not in r for r in ranks), ranks
    assert ranks[0]["result"]["trials"] == ranks[1]["result"]["trials"]
    assert all(r["restored"] and r["grads_equal_across_ranks"] for r in ranks)


@pytest.mark.slow
def test_the_agreed_size_is_the_smaller_ranks_own_maximum(tmp_path: Path) -> None:
    (tmp_path / "alone").mkdir()
    alone = _run("find_mlp_alone", ["16MiB"], tmp_path / "alone")
    small_alone = alone[0]["result"]["max_batch_size"]
    ranks = _run("find_mlp", ["32MiB", "16MiB"], tmp_path)
    agreed = [r["result"]["max_batch_size"] for r in ranks]
    assert agreed[0] == agreed[1]
    assert abs(agreed[0] - small_alone) <= 0.03 * small_alone, (agreed, small_alone)
    # the small rank ran out of memory in trials the large one finished: those are OOM for both
    assert ranks[0]["result"]["trials"] == ranks[1]["result"]["trials"]
    assert any(t["oom"] for t in ranks[0]["result"]["trials"])


@pytest.mark.slow
def test_a_rank_out_of_memory_alone_does_not_deadlock_the_others(tmp_path: Path) -> None:
    ranks = _run("find_mlp", ["256MiB", "8MiB", "256MiB"], tmp_path)
    trials = [r["result"]["trials"] for r in ranks]
    assert trials[0] == trials[1] == trials[2]
    assert all(r["trained_after"] and r["grads_equal_across_ranks"] for r in ranks)


@pytest.mark.slow
def test_ctrl_c_in_one_rank_stops_every_rank_and_restores_the_model(tmp_path: Path) -> None:
    ranks = _run("interrupt", ["24MiB", "24MiB"], tmp_path)
    assert ranks[1]["error"].startswith("KeyboardInterrupt")
    assert ranks[0]["error"].startswith("PeerStopped: rank 1")
    assert all(r["restored"] for r in ranks)


@pytest.mark.slow
def test_fsdp_ranks_are_tracked_each_with_its_own_shard(tmp_path: Path) -> None:
    ranks = _run("fsdp_track", ["64MiB", "64MiB"], tmp_path)
    rep = ranks[0]["report"]
    assert [r["rank"] for r in rep["ranks"]] == [0, 1]
    assert all(r["steps"] == 3 and r["peak_delta_bytes"] > 0 for r in rep["ranks"])


@pytest.mark.slow
def test_fsdp_ranks_agree_on_the_search_and_training_goes_on(tmp_path: Path) -> None:
    ranks = _run("fsdp_find", ["24MiB", "24MiB"], tmp_path)
    assert all("error" not in r for r in ranks), ranks
    assert ranks[0]["result"]["trials"] == ranks[1]["result"]["trials"]
    assert ranks[0]["result"]["max_batch_size"] > 64
    assert all(r["restored"] and r["trained_after"] for r in ranks)


@pytest.mark.slow
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_gpumem_on_start_processes_collects_each_child(ip: Any, clean_ns: None, start_method: str) -> None:
    ip.run_cell("import ddp_worker, torch.multiprocessing as tmp")
    result = ip.run_cell(
        "%%gpumem -d cpu --budget 256MiB -q -o\n"
        f"tmp.start_processes(ddp_worker.spawned, args=(2,), nprocs=2, start_method={start_method!r})"
    )
    result.raise_error()
    rep = result.result
    assert [(r.rank, r.steps) for r in rep.ranks] == [(0, 2), (1, 2)]
    assert rep.peak_rank.rank == 1
    assert rep.world_size == 2


@pytest.mark.slow
def test_a_child_out_of_memory_gets_advice_naming_its_rank(ip: Any, clean_ns: None) -> None:
    from IPython.utils.capture import capture_output
    from torch.multiprocessing import ProcessRaisedException

    ip.run_cell("import ddp_worker, torch.multiprocessing as tmp")
    with capture_output() as cap:
        # about 9 MiB at rank 0's batch 2000, 18 MiB at rank 1's 4000: only rank 1 runs out
        result = ip.run_cell(
            "%%gpumem -d cpu --budget 14MiB\n"
            "tmp.start_processes(ddp_worker.spawned, args=(2, 2000), nprocs=2, start_method='fork')"
        )
    assert isinstance(result.error_in_exec, ProcessRaisedException)
    out = cap.stdout + "".join(o.data.get("text/plain", "") for o in cap.outputs)
    assert "Rank 1" in out


def test_without_a_process_group_the_report_has_no_ranks() -> None:
    import gpumagic

    with gpumagic.track(device="cpu") as t:
        pass
    assert t.report.ranks == ()
    assert t.report.world_size is None


LAUNCH_CELLS = [
    "%load_ext gpumagic\n"
    "import torch, torch.distributed as dist\n"
    "from torch import nn\n"
    "from torch.nn.parallel import DistributedDataParallel as DDP",
    # the function notebook_launcher runs in each process, as in Accelerate's notebook examples
    "def train():\n"
    "    dist.init_process_group('gloo')\n"
    "    rank = dist.get_rank()\n"
    "    model = DDP(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)))\n"
    "    opt = torch.optim.SGD(model.parameters(), lr=0.01)\n"
    "    for _ in range(3):\n"
    "        x = torch.randn(16 * (rank + 1), 64)\n"
    "        loss = nn.functional.mse_loss(model(x), torch.zeros(len(x), 8))\n"
    "        opt.zero_grad(); loss.backward(); opt.step()\n"
    "    dist.destroy_process_group()",
    "%%gpumem -d cpu --budget 256MiB -q -o\n"
    "from accelerate import notebook_launcher\n"
    "notebook_launcher(train, num_processes=2)",
    "rep = _\n"
    "from gpumagic.render.widgets import memory_figure\n"
    "fig = memory_figure(rep)\n"
    "print([(r.rank, r.steps) for r in rep.ranks], rep.world_size, rep.peak_rank.rank,"
    " len(fig.axes[0].patches))",
]


@pytest.mark.slow
def test_gpumem_on_notebook_launcher_shows_every_child_rank(tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    pytest.importorskip("accelerate", reason="Accelerate is a test extra (pip install -e '.[dev]')")

    kernels = tmp_path / "jupyter" / "kernels" / "gpumagic-ddp-test"
    kernels.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (kernels / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "ddp", "language": "python"}))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in LAUNCH_CELLS])
    env = {"JUPYTER_PATH": str(tmp_path / "jupyter"), "IPYTHONDIR": str(tmp_path / "ipython")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, kernel_name="gpumagic-ddp-test", timeout=TIMEOUT_S,
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert text.strip() == "[(0, 3), (1, 3)] 2 1 2"


CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8.00 GiB of which 1.00 GiB "
    "is free. Of the allocated memory 6.00 GiB is allocated by PyTorch, and 0 bytes is reserved by PyTorch but "
    "unallocated."
)


def test_oom_advice_names_the_rank_and_states_the_global_batch() -> None:
    from gpumagic.oom import AdviceContext, advise, parse

    # a size to use needs a measurement (here a search's line: 128 MiB per sample, nothing fixed);
    # from the message alone the advice is the measuring command, with no size to scale
    per_sample = 128 * 2**20
    ctx = AdviceContext(batch_size=64, rank=1, world_size=4, bytes_per_sample=per_sample, intercept_bytes=0,
                        fit_source="search")
    advice = advise(parse(CUDA_OOM), ctx)
    first = advice.suggestions[0]
    assert advice.headline.startswith("Rank 1 of 4: ")
    assert first.batch_size == 53  # 95% of the 7 GiB usable at 128 MiB per sample
    assert "global batch 53 × 4 ranks = 212, was 64 × 4 = 256" in first.detail


def test_oom_advice_finds_the_rank_in_a_start_processes_error() -> None:
    from gpumagic.oom import AdviceContext, advise, parse
    from gpumagic.oom.advice import rank_in_error

    text = "\n\n-- Process 3 terminated with the following error:\nTraceback ...\ntorch.OutOfMemoryError: " + CUDA_OOM
    assert advise(parse(text), AdviceContext(rank=rank_in_error(text))).headline.startswith("Rank 3: ")


def test_report_names_the_rank_with_the_highest_peak_and_the_spread() -> None:
    from gpumagic.report import MemoryReport, RankRecord

    ranks = tuple(RankRecord(r, f"cuda:{r}", peak, peak - 100, None, 3, 1.0) for r, peak in ((0, 900), (1, 1500)))
    rep = MemoryReport("cuda", "cuda:0", 100, 900, 800, 100, None, None, 1.0, ranks=ranks, world_size=2)
    assert rep.peak_rank == ranks[1]
    assert rep.peak_spread_bytes == 600
    assert "rank 1 peaks highest, spread 600 B" in rep.to_text()


def test_the_memory_figure_has_one_bar_per_rank() -> None:
    from gpumagic.render.widgets import memory_figure
    from gpumagic.report import MemoryReport, RankRecord

    ranks = tuple(RankRecord(r, "cpu", 1000 * (r + 1), 10, None, 3, 1.0, budget_bytes=4096) for r in range(3))
    rep = MemoryReport("cpu", "cpu", 0, 0, 0, 0, None, None, 1.0, ranks=ranks, world_size=3)
    assert len(memory_figure(rep).axes[0].patches) == 3
