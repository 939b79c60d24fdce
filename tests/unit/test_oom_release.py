"""After an out-of-memory error the memory is back, whatever the loop's shape (issue 10, section 3),
and no result is lost (issue 19, section 3).

The failed cell's own names (``out``, ``loss``) hold the autograd graph after an OOM in
``backward()``; clearing the traceback's frames does not free it, and the next run at a size
that fits would run out of memory too. The rule: a tensor the failed cell bound that carries a
graph is replaced by its detached value (the value stays, the graph goes); nothing is deleted.
These tests run real loops under a simulated budget.
"""

import weakref

import pytest
import torch
from IPython.utils.capture import capture_output

import gpumagic.oom
from gpumagic.backends.cpu_exact import live_storages
from gpumagic.oom.context import user_frame as _user_frame

SETUP = """
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
X = torch.randn(512, 3, 16, 16); Y = torch.randint(0, 10, (512,))
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(16 * 16 * 16, 10))
opt = torch.optim.SGD(model.parameters(), 0.1)
"""
# a top-level loop, the commonest notebook shape: `out` and `loss` are globals
LOOP = """
for i in range(2):
    idx = torch.randint(0, len(X), (batch_size,))
    out = model(X[idx])
    loss = F.cross_entropy(out, Y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
"""
GPUMEM = "%%gpumem -d cpu --budget 24MiB -q\n"
FITS, IN_BACKWARD, IN_FORWARD = 300, 400, 480  # under the 24 MiB budget (measured)


def run(ip, src):
    with capture_output():
        return ip.run_cell(src, store_history=True)


def at(ip, b, src=GPUMEM + LOOP):
    ip.user_ns["batch_size"] = b
    return run(ip, src)


def live_cpu_bytes():
    return sum(st.nbytes() for st in live_storages("cpu").values())


@pytest.fixture
def cnn(ip, clean_ns):
    run(ip, SETUP)


def test_oom_in_backward_keeps_out_and_loss_without_their_graph(ip, cnn):
    r = at(ip, IN_BACKWARD)
    assert isinstance(r.error_in_exec, torch.OutOfMemoryError)
    assert "loss.backward()" in _user_frame(r.error_in_exec.__traceback__)
    assert ip.user_ns["out"].shape == (IN_BACKWARD, 10)
    assert ip.user_ns["out"].grad_fn is None
    assert ip.user_ns["loss"].grad_fn is None
    assert not ip.user_ns["loss"].requires_grad


def test_the_detached_loss_keeps_its_value(ip, cnn):
    cell = GPUMEM + LOOP.replace("    opt.zero_grad()", "    seen = loss.item()\n    opt.zero_grad()")
    assert at(ip, IN_BACKWARD, cell).error_in_exec is not None
    assert ip.user_ns["loss"].item() == ip.user_ns["seen"]


def test_after_an_oom_in_backward_a_run_at_a_size_that_fits_succeeds(ip, cnn):
    assert at(ip, IN_BACKWARD).error_in_exec is not None
    assert at(ip, FITS).error_in_exec is None


def test_the_autograd_graph_of_the_failed_cell_is_freed(ip, cnn):
    run(ip, "import weakref\nrefs = []")
    cell = GPUMEM + LOOP.replace("    loss = F.cross_entropy",
                                 "    refs.append(weakref.ref(out))\n    loss = F.cross_entropy")
    assert at(ip, IN_BACKWARD, cell).error_in_exec is not None
    assert ip.user_ns["refs"]
    assert all(ref() is None for ref in ip.user_ns["refs"])


def test_the_advice_says_which_names_were_released_and_how_much(ip, cnn):
    r = at(ip, IN_BACKWARD)
    advice = r.error_in_exec.advice
    names = [n for n, _ in advice.released]
    assert "out" in names
    assert "loss" in names
    assert sum(b for _, b in advice.released) > 8 * 2**20  # the graph: activations saved for backward
    assert "`out`, `loss`" in advice.text()
    assert "MiB" in advice.released_note


def test_model_data_and_optimizer_stay_bound_to_the_same_objects(ip, cnn):
    before = {k: ip.user_ns[k] for k in ("model", "X", "Y", "opt")}
    at(ip, IN_BACKWARD)
    assert all(ip.user_ns[k] is v for k, v in before.items())


def test_a_name_the_cell_rebound_keeps_the_cells_value(ip, cnn):
    run(ip, "loss = 0.25\nkeep = torch.zeros(3)\nout = keep")
    at(ip, IN_BACKWARD)
    assert isinstance(ip.user_ns["loss"], torch.Tensor)
    assert ip.user_ns["out"] is not ip.user_ns["keep"]
    assert torch.equal(ip.user_ns["keep"], torch.zeros(3))


def test_oom_in_forward_keeps_the_batch_and_a_fitting_run_succeeds(ip, cnn):
    r = at(ip, IN_FORWARD)
    assert isinstance(r.error_in_exec, torch.OutOfMemoryError)
    assert "out = model(X[idx])" in _user_frame(r.error_in_exec.__traceback__)
    assert ip.user_ns["idx"].shape == (IN_FORWARD,)
    assert at(ip, FITS).error_in_exec is None


def test_oom_in_adams_first_step_gives_back_its_state_and_the_gradients(ip, clean_ns):
    run(ip, """
import torch, torch.nn as nn, torch.nn.functional as F
big = nn.Linear(1024, 1024)
adam = torch.optim.Adam(big.parameters(), 1e-3)
xb = torch.randn(8, 1024)
""")
    base = live_cpu_bytes()
    r = run(ip, "%%gpumem -d cpu --budget 14MiB -q\n"
                "loss = big(xb).pow(2).mean()\nloss.backward()\nadam.step()\n")
    assert isinstance(r.error_in_exec, torch.OutOfMemoryError)
    assert "adam.step()" in _user_frame(r.error_in_exec.__traceback__)
    assert all(p.grad is None for p in ip.user_ns["big"].parameters())
    assert len(ip.user_ns["adam"].state) == 0
    assert live_cpu_bytes() <= base * 1.05


def test_oom_inside_a_function_from_an_earlier_cell_is_given_back(ip, cnn):
    run(ip, "def train(n):\n"
            "    global out, loss\n" + "\n".join("    " + line for line in LOOP.strip().splitlines()).replace(
                "batch_size", "n"))
    r = at(ip, IN_BACKWARD, GPUMEM + "train(batch_size)\n")
    assert isinstance(r.error_in_exec, torch.OutOfMemoryError)
    assert ip.user_ns["out"].grad_fn is None
    assert ip.user_ns["loss"].grad_fn is None
    assert at(ip, FITS, GPUMEM + "train(batch_size)\n").error_in_exec is None


def test_oom_in_a_dataloader_loop_is_given_back(ip, cnn):
    loop = ("from torch.utils.data import DataLoader, TensorDataset\n"
            "for xb, yb in DataLoader(TensorDataset(X, Y), batch_size=batch_size):\n"
            "    out = model(xb)\n    loss = F.cross_entropy(out, yb)\n"
            "    opt.zero_grad(); loss.backward(); opt.step()\n")
    base = live_cpu_bytes()
    assert at(ip, IN_BACKWARD, GPUMEM + loop).error_in_exec is not None
    assert ip.user_ns["out"].grad_fn is None
    kept = sum(ip.user_ns[n].untyped_storage().nbytes() for n in ("xb", "yb", "out", "loss"))
    assert live_cpu_bytes() <= base * 1.05 + kept  # the last batch and outputs stay, as after a run that worked
    assert at(ip, FITS, GPUMEM + loop).error_in_exec is None


def test_ten_oom_cells_in_a_row_leave_nothing_behind(ip, cnn):
    assert at(ip, FITS).error_in_exec is None
    base = live_cpu_bytes()
    for _ in range(10):
        assert at(ip, IN_BACKWARD).error_in_exec is not None
    assert live_cpu_bytes() <= base * 1.05
    assert at(ip, FITS).error_in_exec is None


def test_the_global_handler_releases_the_names_of_a_plain_cell(ip, cnn):
    cell = "import gpumagic\nwith gpumagic.track(device='cpu', budget='24MiB'):\n" + "\n".join(
        "    " + line for line in LOOP.strip().splitlines())
    assert isinstance(at(ip, IN_BACKWARD, cell).error_in_exec, torch.OutOfMemoryError)
    assert ip.user_ns["out"].grad_fn is None
    assert ip.user_ns["loss"].grad_fn is None
    assert gpumagic.oom.last_advice() is not None
    assert at(ip, FITS, cell).error_in_exec is None


def test_the_exception_carries_the_advice_last_shown(ip, cnn):
    r = at(ip, IN_BACKWARD)
    assert r.error_in_exec.advice is gpumagic.oom.last_advice()


def test_names_unrelated_to_device_memory_are_left_alone(ip, cnn):
    r = at(ip, IN_BACKWARD, GPUMEM + "note = 'started'\nhistory = [1, 2]\n" + LOOP)
    assert r.error_in_exec is not None
    assert ip.user_ns["note"] == "started"
    assert ip.user_ns["history"] == [1, 2]


def test_weakref_bindings_do_not_keep_rebound_values_alive(ip, cnn):
    run(ip, "old = torch.empty(2**20, dtype=torch.uint8)")
    ref = weakref.ref(ip.user_ns["old"])
    run(ip, "old = None")
    assert ref() is None


@pytest.mark.slow
def test_after_an_oom_in_backward_the_true_maximum_still_fits(ip, cnn):
    lo, hi = FITS, IN_BACKWARD  # fits, does not: bisect to the largest that fits from a clean start
    while hi - lo > 1:
        mid = (lo + hi) // 2
        run(ip, SETUP)
        lo, hi = (mid, hi) if at(ip, mid).error_in_exec is None else (lo, mid)
    run(ip, SETUP)
    assert at(ip, IN_BACKWARD).error_in_exec is not None
    assert ip.user_ns["out"].grad_fn is None  # the value stays
    assert at(ip, lo).error_in_exec is None
