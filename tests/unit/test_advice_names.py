"""Advice written with the failing code's own optimizer and names (issue 19, sections 4 and 6)."""

import torch

import gpumagic.oom as oom
from gpumagic.batchmath import lr_note
from gpumagic.oom.context import loop_names, optimizer_name

CUDA = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8.00 GiB of which "
        "1.00 GiB is free. Of the allocated memory 6.00 GiB is allocated by PyTorch, and 0 bytes is reserved "
        "by PyTorch but unallocated.")
CELL = """for step, (xb, yb) in enumerate(train_dl):
    logits = net(xb)
    l = criterion(logits, yb)
    sgd.zero_grad()
    l.backward()
    sgd.step()
"""


def test_a_factor_that_rounds_to_one_keeps_the_learning_rate():
    note = lr_note(4096, 4100, "SGD")
    assert "multiply" not in note
    assert note.startswith("keep the learning rate")


def test_an_unknown_optimizer_family_is_said_with_both_rules():
    note = lr_note(256, 1024, "Sophia")
    assert "Sophia is neither a known SGD-like nor Adam-like optimizer" in note
    assert "by 4 if the optimizer is SGD-like" in note
    assert "by 2 if it is Adam-like" in note


def test_no_optimizer_known_names_no_family():
    note = lr_note(256, 1024, None)
    assert "the optimizer the code steps is unknown" in note


def test_a_factor_beyond_the_verified_range_is_called_an_extrapolation():
    assert "extrapolation" in lr_note(4, 4096, "SGD")
    assert "extrapolation" not in lr_note(256, 8192, "SGD")


def test_the_optimizer_a_function_builds_is_found():
    def train():
        model = torch.nn.Linear(2, 2)
        return torch.optim.AdamW(model.parameters())

    assert optimizer_name({"train": train}, "train()") == "AdamW"


def test_an_optimizer_the_cell_does_not_use_is_not_the_cells():
    ns = {"old": torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), 0.1)}
    assert optimizer_name(ns, "x = 1") is None


def test_the_optimizer_that_stepped_wins():
    ns = {"opt": torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), 0.1)}
    assert optimizer_name(ns, "opt.step()", stepped=("Adam",)) == "Adam"


def test_the_accumulation_snippet_uses_the_loops_own_names():
    ctx = oom.AdviceContext(batch_size=4096, bytes_per_sample=1.5 * 2**20, intercept_bytes=2**30,
                            fit_source="search", optimizer="SGD", loop=loop_names(CELL))
    acc = next(s for s in oom.advise(CUDA, ctx).suggestions if s.kind == "accumulation")
    assert acc.code.splitlines()[0].startswith("for i, (xb, yb) in enumerate(train_dl):")
    assert "    logits = net(xb)\n    l = (criterion(logits, yb)) / " in acc.code
    assert "sgd.step()" in acc.code
    assert "optimizer" not in acc.code
    assert "loss_fn" not in acc.code


def test_the_accumulation_snippet_compiles():
    ctx = oom.AdviceContext(batch_size=4096, bytes_per_sample=1.5 * 2**20, intercept_bytes=2**30,
                            fit_source="search", optimizer="SGD", loop=loop_names(CELL))
    acc = next(s for s in oom.advise(CUDA, ctx).suggestions if s.kind == "accumulation")
    compile(acc.code, "<advice>", "exec")
