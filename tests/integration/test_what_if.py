"""%%gpumem --what-if: each remedy's planned peak against the exact tracker's peak of the same
cell with the remedy applied by hand, the batch that then fits run under the same budget, and a
namespace left as it was."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

import pytest
import torch
from IPython.core.error import UsageError
from what_if_loops import MODELS

from gpumagic.report import MemoryReport, Remedy

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

MiB = 2**20

# the budget per model (a fit far enough above the cell's batch to matter), and the remedies
# that must be among the rows: the test cannot pass on an empty table
CASES: dict[str, tuple[int, set[str]]] = {
    "mlp": (8 * MiB, {"autocast (bfloat16)", "zero_grad(set_to_none=True)", "optimizer foreach=False",
                      "SGD with momentum instead of Adam", "Adafactor (factored state) instead of Adam"}),
    "cnn_bn": (24 * MiB, {"autocast (bfloat16)", "autocast (float16) + GradScaler"}),
    "encoder": (24 * MiB, {"autocast (bfloat16)", "activation checkpointing"}),
    "gpt": (48 * MiB, {"autocast (bfloat16)", "activation checkpointing"}),
}


# Each model costs 25-40 s per test here. The suite keeps the models that cover each kind of
# remedy row (the optimizer remedies on the MLP, both autocasts on the CNN with BatchNorm) and
# each batch knob (an int, a DataLoader); bench/what_if.py plans and measures all four, the
# transformer encoder and the GPT-style decoder (activation checkpointing) included.
EXACT_MODELS = ["cnn_bn", "mlp"]
FITS_MODELS = ["cnn_bn", "mlp"]
assert set(EXACT_MODELS) | set(FITS_MODELS) <= set(MODELS)


def _run(ip: InteractiveShell, src: str) -> Any:
    res = ip.run_cell(src)
    if res.error_in_exec is not None:
        raise res.error_in_exec
    return res.result


def _what_if(ip: InteractiveShell, name: str, budget: int | None) -> MemoryReport:
    setup, cell, _ = MODELS[name]
    _KEEP.clear()
    _KEEP.update(ip.user_ns)
    return _gpumem(ip, setup, cell, budget, "--what-if ")


def _gpumem(ip: InteractiveShell, before: str, cell: str, budget: int | None, flags: str = "") -> MemoryReport:
    """Run ``before``, collect, then ``%%gpumem {flags}-d cpu`` on ``cell`` (under ``budget``): its report."""
    _run(ip, before)
    gc.collect()
    opts = f" --budget {budget}" if budget is not None else ""
    rep = _run(ip, f"%%gpumem {flags}-d cpu -q -o{opts}\n{cell}")
    assert isinstance(rep, MemoryReport)
    return rep


def _knob(name: str, b: int) -> str:
    return f"loader = DataLoader(data, batch_size={b})" if name == "cnn_bn" else f"bs = {b}"


def _by_hand(name: str, remedy: Remedy, batch: int | None = None) -> tuple[str, str]:
    """(code run before the cell, the cell) with the remedy applied as a person would apply it."""
    setup, cell, hand = MODELS[name]
    key = next((k for k in hand if k and remedy.name.startswith(k)), None)
    before, body = (remedy.code, cell) if key is None else ("", hand[key])  # a change before the loop: literally
    if remedy.accumulation_steps is not None:
        assert remedy.micro_batch_size is not None
        before = _knob(name, remedy.micro_batch_size) + f"\nK = {remedy.accumulation_steps}"
    if batch is not None:
        before = _knob(name, batch) + "\n" + before
    return setup + "\n" + before, body


_KEEP: set[str] = set()


def _fresh(ip: InteractiveShell) -> None:
    """Drop every name an earlier measurement of the test made (its outputs, iterators, blocks), then
    collect: each measurement starts from what its own setup builds, like the plan did."""
    for name in [n for n in ip.user_ns if _KEEP and n not in _KEEP]:
        del ip.user_ns[name]
    gc.collect()


def _exact(ip: InteractiveShell, before: str, cell: str, budget: int | None = None) -> MemoryReport:
    _fresh(ip)
    return _gpumem(ip, before, cell, budget)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXACT_MODELS)
def test_each_remedy_is_within_5_percent_of_the_exact_peak_with_it_applied_by_hand(
    ip: InteractiveShell, clean_ns: None, name: str
) -> None:
    budget, expected = CASES[name]
    rep = _what_if(ip, name, budget)
    assert expected <= {r.name for r in rep.what_if}
    setup, cell, _ = MODELS[name]
    assert _exact(ip, setup, cell).peak_bytes == pytest.approx(rep.peak_bytes, rel=0.05)
    for remedy in rep.what_if:
        exact = _exact(ip, *_by_hand(name, remedy))
        assert exact.peak_bytes == pytest.approx(remedy.peak_bytes, rel=0.05), remedy.name


@pytest.mark.slow
@pytest.mark.parametrize("name", FITS_MODELS)
def test_the_batch_that_then_fits_runs_under_the_same_budget(ip: InteractiveShell, clean_ns: None, name: str) -> None:
    budget, _ = CASES[name]
    rep = _what_if(ip, name, budget)
    setup, cell, _ = MODELS[name]
    assert rep.batch_size_that_fits is not None or name == "mlp"  # the MLP's optimizer step alone is over it
    rows = [r for r in rep.what_if if r.batch_size_that_fits is not None]
    assert rows
    if rep.batch_size_that_fits is not None:
        _exact(ip, setup + "\n" + _knob(name, rep.batch_size_that_fits), cell, budget)
    for remedy in rows:
        assert remedy.batch_size_that_fits is not None
        exact = _exact(ip, *_by_hand(name, remedy, remedy.batch_size_that_fits), budget=budget)
        assert exact.error is None, remedy.name
        assert exact.peak_bytes <= budget


# --- a tiny model: the table, the namespace, the options -----------------------------------------

_TINY = """
torch.manual_seed(0)
class Block(nn.Module):
    def __init__(self):
        super().__init__(); self.a = nn.Linear(32, 64); self.b = nn.Linear(64, 32)
    def forward(self, x):
        return x + self.b(F.relu(self.a(x)))
model = nn.Sequential(nn.Linear(16, 32), Block(), Block(), Block(), nn.Linear(32, 4))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
bs = 8
"""
_TINY_CELL = """
for step in range(4):
    x, y = torch.randn(bs, 16), torch.randint(0, 4, (bs,))
    opt.zero_grad()
    out = model(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    opt.step()
"""


@pytest.mark.slow  # a dozen plans: 8-40 s on a loaded 2-core machine
def test_what_if_changes_nothing_of_the_users(ip: InteractiveShell, clean_ns: None) -> None:
    _run(ip, _TINY)
    ns = ip.user_ns
    model, opt = ns["model"], ns["opt"]
    weights = [p.detach().clone() for p in model.parameters()]
    _run(ip, f"%%gpumem --what-if -d cpu -q\n{_TINY_CELL}")
    assert ns["model"] is model
    assert ns["opt"] is opt
    assert ns["bs"] == 8
    assert "out" not in ns
    assert "loss" not in ns
    assert not opt.state
    assert all(torch.equal(p, w) and p.grad is None for p, w in zip(model.parameters(), weights, strict=True))
    assert all("forward" not in vars(m) for m in model.modules())  # checkpointing patched only the copies


@pytest.mark.slow  # a dozen plans: 8-40 s on a loaded 2-core machine
def test_checkpointing_the_repeated_blocks_names_them_and_counts_the_recomputed_flops(
    ip: InteractiveShell, clean_ns: None
) -> None:
    _run(ip, _TINY)
    rep = _run(ip, f"%%gpumem --what-if -d cpu -q -o\n{_TINY_CELL}")
    ck = next(r for r in rep.what_if if r.name == "activation checkpointing")
    assert "[m for m in model if type(m).__name__ == 'Block']" in ck.code
    assert ck.cost is not None
    assert ck.cost.startswith("+")
    assert "FLOPs" in ck.cost
    assert ck.cost != "+0% FLOPs per step (the recomputed forward)"


@pytest.mark.slow  # a dozen plans: 8-40 s on a loaded 2-core machine
def test_without_a_budget_no_batch_that_fits_is_claimed(ip: InteractiveShell, clean_ns: None) -> None:
    _run(ip, _TINY)
    rep = _run(ip, f"%%gpumem --what-if -d cpu -q -o\n{_TINY_CELL}")
    assert rep.batch_size_that_fits is None
    assert all(r.batch_size_that_fits is None for r in rep.what_if)


@pytest.mark.slow  # a dozen plans: 8-40 s on a loaded 2-core machine
def test_a_cell_already_under_autocast_gets_no_autocast_rows(ip: InteractiveShell, clean_ns: None) -> None:
    _run(ip, _TINY)
    cell = _TINY_CELL.replace("    out = model(x)", '    with torch.autocast("cpu", dtype=torch.bfloat16):\n'
                                                  "        out = model(x)")
    rep = _run(ip, f"%%gpumem --what-if -d cpu -q -o\n{cell}")
    assert rep.what_if
    assert not [r for r in rep.what_if if r.name.startswith("autocast")]


@pytest.mark.slow  # a dozen plans: 8-40 s on a loaded 2-core machine
def test_text_and_html_show_the_same_rows(ip: InteractiveShell, clean_ns: None) -> None:
    _run(ip, _TINY)
    rep = _run(ip, f"%%gpumem --what-if -d cpu -q -o --budget 1MiB\n{_TINY_CELL}")
    rows = rep.what_if_rows()
    assert rows[0][0] == "as written"
    assert len(rows) == len(rep.what_if) + 1
    text, html = rep.to_text(), rep._repr_html_()
    for row in rows:
        assert row[0] in text
        assert row[0].replace("'", "&#x27;") in html
        assert all(v in text for v in row)


def test_what_if_on_the_line_magic_is_a_usage_error(ip: InteractiveShell) -> None:
    with pytest.raises(UsageError, match="--what-if applies to the cell magic"):
        ip.run_line_magic("gpumem", "--what-if")


def test_what_if_with_a_bad_budget_names_it(ip: InteractiveShell, clean_ns: None) -> None:
    with pytest.raises(UsageError, match="--budget"):
        ip.run_cell_magic("gpumem", "--what-if -d cpu --budget lots", "x = 1\n")


# --- the OOM advice uses the same plans ---------------------------------------------------------------


@pytest.mark.slow
def test_following_the_oom_advice_remedy_line_literally_fits(ip: InteractiveShell, clean_ns: None) -> None:
    setup, cell, hand = MODELS["gpt"]
    budget = 48 * MiB
    _run(ip, setup + "\nbs = 40")  # the plan says 27 fits as written
    res = ip.run_cell(f"%%gpumem -d cpu --budget {budget} -q\n{cell}")
    assert isinstance(res.error_in_exec, torch.OutOfMemoryError)
    advice = res.error_in_exec.advice
    line = next(s for s in advice.suggestions if s.kind == "remedy")
    assert " saves " in line.title
    assert "on this cell" in line.title
    assert line.batch_size is not None
    assert line.batch_size > 40
    assert f"batch {line.batch_size} then fits (now " in line.detail
    assert not [s for s in advice.suggestions if s.kind in ("mixed_precision", "checkpointing")]
    key = next((k for k in hand if k and line.title.startswith(k)), None)
    before, body = (line.code or "", cell) if key is None else ("", hand[key])
    report = _exact(ip, f"{setup}\nbs = {line.batch_size}\n{before}", body, budget=budget)
    assert report.error is None


@pytest.mark.slow
def test_a_cell_the_dry_run_cannot_plan_keeps_the_advice_and_says_why(ip: InteractiveShell, clean_ns: None) -> None:
    _run(ip, _TINY.replace("bs = 8", "bs = 4096"))
    cell = _TINY_CELL.replace("    loss.backward()", "    loss = loss + out[out > 0].sum() * 0\n    loss.backward()")
    res = ip.run_cell(f"%%gpumem -d cpu --budget 2MiB -q\n{cell}")
    assert isinstance(res.error_in_exec, torch.OutOfMemoryError)
    advice = res.error_in_exec.advice
    assert any("a dry run could not plan this cell (DryRunError)" in u for u in advice.unknown)
    assert not [s for s in advice.suggestions if s.kind == "remedy"]
    assert [s for s in advice.suggestions if s.kind == "mixed_precision"]


@pytest.mark.slow
def test_the_api_plans_a_callable_and_finds_its_global_batch_knob(ip: InteractiveShell, clean_ns: None) -> None:
    import gpumagic

    ns: dict[str, Any] = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional}
    exec(_TINY + "\ndef train():\n" + "\n".join("    " + ln for ln in _TINY_CELL.strip().splitlines()), ns)
    rep = gpumagic.what_if(ns["train"], device="cpu", budget="1MiB")
    assert rep.dry_run
    assert rep.batch_size_that_fits is not None
    assert "activation checkpointing" in {r.name for r in rep.what_if}
    assert ns["bs"] == 8


def test_the_api_names_a_bad_steps_value() -> None:
    import gpumagic

    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        gpumagic.what_if(lambda: None, device="cpu", steps=0)


@pytest.mark.slow  # a handful of plans
def test_track_what_if_plans_the_with_blocks_own_code(ip: InteractiveShell, clean_ns: None) -> None:
    r = ip.run_cell("""
import gpumagic
torch.manual_seed(0)
wi_model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
wi_opt = torch.optim.Adam(wi_model.parameters(), 1e-3)
wi_w0 = wi_model[0].weight.detach().clone()
with gpumagic.track(what_if=True, device="cpu", budget="4MiB") as wi_t:
    for _ in range(3):
        wi_x = torch.randn(256, 64)
        wi_loss = F.cross_entropy(wi_model(wi_x), torch.randint(0, 10, (256,)))
        wi_opt.zero_grad(); wi_loss.backward(); wi_opt.step()
""")
    assert r.error_in_exec is None, r.error_in_exec
    rep = ip.user_ns["wi_t"].report
    assert rep.dry_run
    names = [x.name for x in rep.what_if]
    assert "autocast (bfloat16)" in names
    assert all(x.saved_bytes is not None for x in rep.what_if)
    assert torch.equal(ip.user_ns["wi_w0"], ip.user_ns["wi_model"][0].weight)  # a plan: nothing of yours changed
    assert not any("clear_refs" in n for n in rep.notes)


def test_track_what_if_inside_a_function_names_the_callable_form() -> None:
    import gpumagic

    def inner() -> None:
        with gpumagic.track(what_if=True, device="cpu"):
            pass

    with pytest.raises(ValueError, match=r"gpumagic\.what_if\(fn"):
        inner()
