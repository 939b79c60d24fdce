"""A dry run touches nothing: it writes no file, runs the user's hooks as a real run does, counts
memory by a rule (a tensor's storages, whatever its layout; meta holds none), and states what it
cannot plan instead of crashing."""

from __future__ import annotations

import builtins
import io
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

import gpumagic
from gpumagic._nowrite import WriteGuard

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

SMALL = "model = nn.Linear(4, 2)\nopt = torch.optim.SGD(model.parameters(), lr=0.1)\n"


def _plan(ip: InteractiveShell, cell: str, line: str = "--dry-run -d cpu") -> Any:
    """Run ``cell`` under ``%%gpumem {line} -o``; the report (None when the cell failed) and the error."""
    r = ip.run_cell(f"%%gpumem {line} -o\n{cell}")
    return r.result, r.error_in_exec


def _notes(report: Any) -> str:
    return "\n".join(report.notes)


# --- a plan never writes ---------------------------------------------------------------------------


def test_dry_run_does_not_overwrite_a_checkpoint(
    ip: InteractiveShell, clean_ns: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.randn(1000)}, "ckpt.pt")
    before = Path("ckpt.pt").read_bytes()
    ip.run_cell(SMALL)
    rep, err = _plan(ip, "for i in range(2):\n"
                         "    model(torch.randn(8, 4)).sum().backward(); opt.step(); opt.zero_grad()\n"
                         "torch.save(model.state_dict(), 'ckpt.pt')\n")
    assert err is None
    assert Path("ckpt.pt").read_bytes() == before
    assert "not written: ckpt.pt (torch.save)" in _notes(rep)


def test_dry_run_writes_through_no_library_and_removes_nothing(
    ip: InteractiveShell, clean_ns: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("log.txt").write_text("kept")
    ip.run_cell(SMALL + "import json, pickle, pathlib, numpy as np")
    rep, err = _plan(ip, "np.save('a.npy', np.zeros(3))\n"
                         "np.savez('b.npz', x=np.zeros(3))\n"
                         "pathlib.Path('c.txt').write_text('x')\n"
                         "with open('log.txt', 'a') as f:\n    f.write('more')\n"
                         "with open('d.json', 'w') as f:\n    json.dump({}, f)\n"
                         "with open('e.pkl', 'wb') as f:\n    pickle.dump(1, f)\n"
                         "import os; os.remove('log.txt'); os.makedirs('out/run1', exist_ok=True)\n"
                         "model(torch.randn(8, 4)).sum().backward()\n")
    assert err is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt"]
    assert Path("log.txt").read_text() == "kept"
    notes = _notes(rep)
    for name in ("a.npy (numpy.save)", "b.npz (numpy.savez)", "c.txt (pathlib.Path.write_text)"):
        assert name in notes


def test_dry_run_skips_writes_to_a_file_opened_before_the_plan(
    ip: InteractiveShell, clean_ns: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ip.run_cell(SMALL + "import pickle\nsink = open('sink.pkl', 'wb')")
    try:
        rep, err = _plan(ip, "pickle.dump(model.state_dict(), sink)\ntorch.save(model.state_dict(), sink)\n")
    finally:
        ip.run_cell("sink.close()")
    assert err is None
    assert Path("sink.pkl").read_bytes() == b""
    assert "sink.pkl (pickle.dump)" in _notes(rep)


def test_dry_run_keeps_temporary_files_working(
    ip: InteractiveShell, clean_ns: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ip.run_cell(SMALL + "import tempfile, os")
    rep, err = _plan(ip, "with tempfile.TemporaryDirectory() as d:\n"
                         "    with open(os.path.join(d, 'x.txt'), 'w') as f:\n        f.write('1')\n"
                         "    with open(os.path.join(d, 'x.txt')) as f:\n        assert f.read() == '1'\n"
                         "with tempfile.NamedTemporaryFile() as tf:\n    tf.write(b'abc')\n"
                         "model(torch.randn(8, 4)).sum().backward()\n")
    assert err is None
    assert "not written" not in _notes(rep)
    assert list(tmp_path.iterdir()) == []


def test_dry_run_puts_every_file_function_back_even_when_the_cell_fails(ip: InteractiveShell, clean_ns: None) -> None:
    before = (builtins.open, io.open, os.open, os.remove, os.mkdir, torch.save, ip.user_ns["open"])
    _, err = _plan(ip, "raise KeyError('boom')")
    assert isinstance(err, KeyError)
    assert (builtins.open, io.open, os.open, os.remove, os.mkdir, torch.save, ip.user_ns["open"]) == before


def test_write_guard_leaves_other_threads_writing(tmp_path: Path) -> None:
    target = tmp_path / "other.txt"

    def write() -> None:
        with open(target, "w") as f:
            f.write("from another thread")

    with WriteGuard() as guard:
        t = threading.Thread(target=write)
        t.start()
        t.join()
        with open(tmp_path / "mine.txt", "w") as f:
            f.write("diverted")
    assert target.read_text() == "from another thread"
    assert not (tmp_path / "mine.txt").exists()
    assert guard.skipped == [f"{tmp_path / 'mine.txt'} (open)"]


def test_track_api_dry_run_writes_nothing(tmp_path: Path) -> None:
    ns: dict[str, Any] = {"torch": torch, "path": str(tmp_path / "w.pt")}
    with gpumagic.track(dry_run=True, device="cpu", namespace=ns) as t:
        exec("x = torch.randn(4, 4)\ntorch.save(x, path)\n", ns)
    assert not (tmp_path / "w.pt").exists()
    assert f"{tmp_path / 'w.pt'} (torch.save)" in _notes(t.report)


# --- values -----------------------------------------------------------------------------------------


def test_formatting_a_loss_in_a_plan_reads_a_placeholder(ip: InteractiveShell, clean_ns: None) -> None:
    ip.run_cell(SMALL)
    rep, err = _plan(ip, "loss = model(torch.randn(8, 4)).sum()\ntext = f'{loss:.3f}'\n")
    assert err is None
    assert "text = f'{loss:.3f}'" in _notes(rep)


def test_formatting_a_vector_in_a_plan_fails_as_in_a_real_run(ip: InteractiveShell, clean_ns: None) -> None:
    ip.run_cell(SMALL)
    real = ip.run_cell("f'{torch.randn(3):.3f}'").error_in_exec
    _, err = _plan(ip, "f'{torch.randn(3):.3f}'\n")
    assert type(err) is type(real) is TypeError


# --- the user's hooks run in a plan as in a real run -------------------------------------------------

HOOKED = SMALL + "def refuse(*a):\n    raise ValueError('refused by the hook')\n"
STEP = "model(torch.randn(8, 4)).sum().backward()\nopt.step()\n"


@pytest.mark.parametrize("register", [
    "model.weight.register_hook(refuse)",
    "model.weight.register_post_accumulate_grad_hook(refuse)",
    "opt.register_step_pre_hook(refuse)",
    "opt.register_step_post_hook(refuse)",
    "model.register_forward_hook(refuse)",
])
def test_a_hook_that_fails_the_real_run_fails_the_plan(ip: InteractiveShell, clean_ns: None, register: str) -> None:
    ip.run_cell(HOOKED + register)
    real = ip.run_cell(STEP).error_in_exec
    _, planned = _plan(ip, STEP)
    assert type(real) is type(planned) is ValueError


def test_a_plan_runs_the_hooks_of_a_plain_tensor_and_of_a_model_reached_by_a_closure() -> None:
    calls: list[str] = []
    w = torch.randn(3, requires_grad=True)
    w.register_hook(lambda g: calls.append("w"))
    model = torch.nn.Linear(3, 1)
    model.weight.register_hook(lambda g: calls.append("closure"))

    def step() -> None:
        (model(w.unsqueeze(0)).sum()).backward()

    ns: dict[str, Any] = {"w": w, "step": step}
    with gpumagic.track(dry_run=True, device="cpu", namespace=ns):
        exec("step()", ns)
    assert sorted(calls) == ["closure", "w"]


# --- counting by a rule: a tensor's storages, whatever made them --------------------------------------

MiB = 2**20
RESTORAGED = {
    "resize_": "b = torch.empty(0)\nb.resize_(1_000_000)\n",
    "UntypedStorage + set_": "st = torch.UntypedStorage(4_000_000)\nt = torch.empty(0).set_(st)\n",
    "resize_as_": "b = torch.empty(0)\nb.resize_as_(torch.empty(1000, 1000, device='meta'))\n",
}


def _exact(cell: str, budget: str | None = None) -> Any:
    ns: dict[str, Any] = {"torch": torch}
    with gpumagic.track(device="cpu", budget=budget) as t:
        exec(cell, ns)
    return t.report


def _dry(cell: str) -> Any:
    ns: dict[str, Any] = {"torch": torch}
    with gpumagic.track(dry_run=True, device="cpu", namespace=ns) as t:
        exec(cell, ns)
    return t.report


@pytest.mark.parametrize("name", sorted(RESTORAGED))
def test_memory_put_under_an_existing_tensor_is_counted(name: str) -> None:
    rep = _exact(RESTORAGED[name])
    assert rep.peak_delta_bytes == 4_000_000
    assert rep.incomplete is None


@pytest.mark.parametrize("name", sorted(RESTORAGED))
def test_memory_put_under_an_existing_tensor_cannot_escape_the_budget(name: str) -> None:
    with pytest.raises(torch.OutOfMemoryError):
        _exact(RESTORAGED[name], budget="1MiB")


def test_a_resize_refused_by_the_budget_leaves_the_tensor_as_it_was() -> None:
    ns: dict[str, Any] = {"torch": torch}
    with pytest.raises(torch.OutOfMemoryError), gpumagic.track(device="cpu", budget="1MiB"):
        exec("b = torch.zeros(10)\nb.resize_(1_000_000)\n", ns)
    assert ns["b"].shape == (10,)


def test_a_resize_that_grows_a_counted_tensor_counts_the_new_buffer_once() -> None:
    rep = _exact("b = torch.zeros(250_000)\nb.resize_(1_000_000)\n")
    assert rep.peak_delta_bytes == 4_000_000 + 1_000_000  # the old buffer lives until the copy is done
    assert rep.end_bytes - rep.baseline_bytes == 4_000_000


@pytest.mark.parametrize("name", sorted(RESTORAGED))
def test_a_plan_counts_memory_put_under_an_existing_tensor_as_the_exact_tracker_does(name: str) -> None:
    rep = _dry(RESTORAGED[name])
    assert rep.peak_delta_bytes == _exact(RESTORAGED[name]).peak_delta_bytes
    assert rep.error is None


def test_a_meta_tensor_in_a_plan_is_no_memory() -> None:
    cell = "m = torch.empty(10**9, device='meta')\nn = m * 2\n"
    assert _dry(cell).peak_delta_bytes == _exact(cell).peak_delta_bytes == 0


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_a_strided_nested_tensor_through_a_module_leaves_the_report_complete() -> None:
    ns: dict[str, Any] = {"torch": torch, "lin": torch.nn.Linear(4, 8)}
    with gpumagic.track(device="cpu") as t:
        exec("nt = torch.nested.as_nested_tensor([torch.randn(300, 4), torch.randn(500, 4)])\ny = lin(nt)\n", ns)
    assert t.report.incomplete is None
    assert t.report.peak_delta_bytes >= (800 * 4 + 800 * 8) * 4


def test_a_dtensor_on_a_one_rank_group_is_counted_and_kept_under_the_budget(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ns: dict[str, Any] = {"torch": torch, "mesh": init_device_mesh("cpu", (1,)), "Shard": Shard,
                              "distribute_tensor": distribute_tensor}
        cell = "d = distribute_tensor(torch.zeros(1000, 100), mesh, [Shard(0)])\ne = d * 2\n"
        with gpumagic.track(device="cpu") as t:
            exec(cell, ns)
        assert t.report.incomplete is None
        assert t.report.peak_delta_bytes == 2 * 400_000
        with pytest.raises(torch.OutOfMemoryError), gpumagic.track(device="cpu", budget=600_000):
            exec(cell, ns)
    finally:
        dist.destroy_process_group()


def test_a_plan_counts_a_grown_buffer_as_the_exact_tracker_does() -> None:
    cell = "b = torch.zeros(250_000)\nb.resize_(1_000_000)\n"
    assert _dry(cell).peak_delta_bytes == _exact(cell).peak_delta_bytes == 5_000_000


# --- a planned search with nothing on the planned device --------------------------------------------

CPU_LOOP = ("model = nn.Linear(64, 10)\nopt = torch.optim.SGD(model.parameters(), lr=0.1)\nbatch_size = 8\n")
CPU_BODY = ("x = torch.randn(batch_size, 64)\n"
            "model(x).sum().backward()\nopt.step()\nopt.zero_grad()\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the model must stay off the planned GPU")
@pytest.mark.parametrize("line", ["--dry-run --gpu T4 --var batch_size",
                                  "--dry-run -d cuda --budget 1MiB --var batch_size"])
def test_a_planned_search_with_nothing_on_the_planned_device_says_so(
    ip: InteractiveShell, clean_ns: None, line: str
) -> None:
    ip.run_cell(CPU_LOOP)
    r = ip.run_cell(f"%%find_batch {line} -o\n" + "for _ in range(3):\n" + "".join(
        "    " + ln + "\n" for ln in CPU_BODY.splitlines()))
    assert r.error_in_exec is None
    res = r.result
    assert res.recommended_batch_size is None
    assert "nothing of the trial was on" in res.reason
    assert len(res.trials) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the model must stay off the planned GPU")
def test_find_batch_api_dry_run_with_nothing_on_the_planned_gpu_says_so() -> None:
    model = torch.nn.Linear(64, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(b: int) -> None:
        model(torch.randn(b, 64)).sum().backward()
        opt.step()
        opt.zero_grad()

    res = gpumagic.find_batch(step, dry_run=True, gpu="T4", namespace={"model": model, "opt": opt},
                              progress=False)
    assert res.recommended_batch_size is None
    assert "nothing of the trial was on T4 (cuda)" in res.reason


# --- what a plan cannot run fails cleanly; what it can, it plans ------------------------------------


def test_a_plan_draws_batches_from_worker_processes(
    ip: InteractiveShell, clean_ns: None, capfd: pytest.CaptureFixture[str]
) -> None:
    ip.run_cell(SMALL + "ds = torch.utils.data.TensorDataset(torch.randn(64, 4))\n"
                        "dl = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)")
    capfd.readouterr()
    rep, err = _plan(ip, "for (xb,) in dl:\n    model(xb).sum().backward(); opt.step(); opt.zero_grad()\n")
    assert err is None
    assert rep.total_steps == 3
    assert "Traceback" not in capfd.readouterr().err


def test_a_plan_runs_lbfgs_with_a_closure_step_after_step(ip: InteractiveShell, clean_ns: None) -> None:
    ip.run_cell(SMALL + "lbfgs = torch.optim.LBFGS(model.parameters(), line_search_fn='strong_wolfe')")
    rep, err = _plan(ip, "for i in range(5):\n"
                         "    def closure():\n"
                         "        lbfgs.zero_grad(); loss = model(torch.randn(8, 4)).sum(); loss.backward()\n"
                         "        return loss\n"
                         "    lbfgs.step(closure)\n")
    assert err is None
    assert rep.total_steps == 3


def test_a_jagged_nested_tensor_stops_the_plan_with_the_reason_and_nothing_on_stderr(
    ip: InteractiveShell, clean_ns: None, capfd: pytest.CaptureFixture[str]
) -> None:
    from gpumagic.dryrun import DryRunError

    capfd.readouterr()
    _, err = _plan(ip, "nt = torch.nested.nested_tensor([torch.randn(3, 4), torch.randn(5, 4)], layout=torch.jagged)\n"
                       "y = nt * 2\n")
    assert isinstance(err, DryRunError)
    assert "jagged nested tensor" in str(err)
    assert "fake_tensor.py" not in capfd.readouterr().err


def test_a_storage_set_on_a_tensor_of_another_device_fails_the_plan_as_the_real_run(
    ip: InteractiveShell, clean_ns: None, capfd: pytest.CaptureFixture[str]
) -> None:
    cell = "t = torch.empty(0, device='meta').set_(torch.UntypedStorage(10))\n"
    real = ip.run_cell(cell).error_in_exec
    capfd.readouterr()
    _, err = _plan(ip, cell)
    assert type(err) is type(real) is RuntimeError
    assert "fake_tensor.py" not in capfd.readouterr().err


# --- a planned cell counts as completed ----------------------------------------------------------------


@pytest.mark.slow
def test_find_batch_alone_after_a_planned_cell_searches_that_cell_not_an_older_oom(
    ip: InteractiveShell, clean_ns: None
) -> None:
    oom = ip.run_cell("%%gpumem -d cpu --budget 1MiB\nbig = torch.empty(10**7)\n", store_history=True)
    assert isinstance(oom.error_in_exec, torch.OutOfMemoryError)
    ip.run_cell(CPU_LOOP)
    planned = ip.run_cell("%%gpumem --dry-run -d cpu\n" + CPU_BODY, store_history=True)
    assert planned.error_in_exec is None
    r = ip.run_cell("%find_batch -d cpu --budget 8MiB --var batch_size --max 64 -o")
    assert r.error_in_exec is None
    assert r.result.recommended_batch_size is not None


# --- a plan is called a plan -----------------------------------------------------------------------------


def _mixed(dry_run: bool) -> Any:
    from gpumagic.report import BatchSearchResult, Trial

    planned = (Trial(2, 1000, False, None, 0.1, 3, planned=True), Trial(64, None, True, None, 0.1, 3, planned=True),
               Trial(32, 3000, False, None, 0.1, 3, planned=True))
    real = () if dry_run else (Trial(30, 2900, False, 900.0, 0.3, 3), Trial(33, 3100, False, 950.0, 0.3, 3))
    return BatchSearchResult(trials=planned + real, max_batch_size=33 if real else 32, recommended_batch_size=30,
                             accumulation_steps=1, reason="why", fit=None, capacity_bytes=4000,
                             predicted_peak_bytes=2900, dry_run=dry_run, device="T4 (cuda)" if dry_run else "cpu")


def test_a_search_that_planned_first_counts_real_trials_apart_from_plans() -> None:
    from gpumagic.render.text import search_text

    res = _mixed(dry_run=False)
    lines = search_text(res, 200).splitlines()
    assert "· 2 trials, 0 OOM, after 3 planned (1 would not fit) on cpu" in lines[0]
    assert "2 trials, 0 OOM, after 3 planned (1 would not fit)" in repr(res)
    rows = [line.split()[:3] for line in lines if line.startswith("  ") and line.split()[0] in ("plan", "1", "2")]
    assert [r[:2] if r[0] != "plan" else r[:3] for r in rows] == [
        ["plan", "1", "2"], ["plan", "2", "64"], ["plan", "3", "32"], ["1", "30"], ["2", "33"]]
    assert "would not fit" in "\n".join(lines)
    assert "out of memory" not in "\n".join(lines)


def test_a_planned_search_headline_says_planned() -> None:
    from gpumagic.render.text import search_text

    head = search_text(_mixed(dry_run=True), 200).splitlines()[0]
    assert head.startswith("find_batch plan: recommended 30 (largest planned to fit 32) · 3 planned trials, "
                           "1 would not fit for T4 (cuda)")


def test_a_dry_run_report_headline_says_planned(ip: InteractiveShell, clean_ns: None) -> None:
    from gpumagic.render.text import memory_report_text

    ip.run_cell(SMALL)
    rep, _ = _plan(ip, "model(torch.randn(8, 4)).sum().backward()\n", "--dry-run --gpu T4")
    head = memory_report_text(rep, 200).splitlines()[0]
    assert head.startswith("gpumem plan: planned peak ")
    assert " for cuda:0 (T4) " in head
    assert " on " not in head


@pytest.mark.slow
def test_a_planned_search_writes_nothing_and_says_what_it_skipped(
    ip: InteractiveShell, clean_ns: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ip.run_cell(SMALL + "batch_size = 8")
    r = ip.run_cell("%%find_batch --dry-run -d cpu --budget 1MiB --var batch_size --max 64 -q -o\n"
                    "model(torch.randn(batch_size, 4)).sum().backward()\n"
                    "torch.save(model.state_dict(), 'ckpt.pt')\n"
                    "opt.step()\nopt.zero_grad()\n")
    assert r.error_in_exec is None
    assert list(tmp_path.iterdir()) == []
    assert any(n.startswith("not written: ckpt.pt (torch.save)") for n in r.result.notes)


# --- sparse results ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Sparse")
def test_a_coalesced_sparse_result_is_planned_as_the_exact_tracker_counts_it() -> None:
    ns: dict[str, Any] = {"torch": torch, "i": torch.randint(0, 1000, (2, 10000)), "v": torch.randn(10000)}
    cell = "s = torch.sparse_coo_tensor(i, v, (1000, 1000)).coalesce()\n"
    with gpumagic.track(device="cpu") as t:
        exec(cell, dict(ns))
    with gpumagic.track(dry_run=True, device="cpu", namespace=ns) as p:
        exec(cell, ns)
    assert p.report.peak_delta_bytes == t.report.peak_delta_bytes > 0


@pytest.mark.filterwarnings("ignore:Sparse")
@pytest.mark.parametrize("convert", ["to_sparse()", "to_sparse_csr()", "to_sparse_csc()"])
def test_a_sparse_result_whose_size_depends_on_the_data_is_planned_at_its_upper_bound(convert: str) -> None:
    dense = torch.rand(300, 300) + 0.5
    dense[::2] = 0  # exactly half the positions zero (random zeros made the bound below flaky)
    real = getattr(dense, convert.split("(")[0])()
    from gpumagic._tensors import storages

    parts = storages(real)
    assert parts is not None
    real_bytes = sum(st.nbytes() for _, st in parts)
    ns: dict[str, Any] = {"torch": torch, "d": dense}
    with gpumagic.track(dry_run=True, device="cpu", namespace=ns) as p:
        exec(f"s = d.{convert}\n", ns)
    assert real_bytes <= p.report.peak_delta_bytes <= 2 * real_bytes + 4096
    assert "every position non-zero: an upper bound" in _notes(p.report)
