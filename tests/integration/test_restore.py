"""After %find_batch (and a dry run), everything the trials changed is as before: issue 19, section 1.

Each test runs a real search in a real IPython shell on objects the old snapshot did not know
about, and compares the state with what it was before the search.
"""

import pytest
import torch
from IPython.utils.capture import capture_output

from gpumagic.report import BatchSearchResult

SEARCH = "%%find_batch --var batch_size -d cpu --budget 24MiB --max 256 -o\n"


def run(ip, src):
    with capture_output():
        r = ip.run_cell(src, store_history=True)
    assert r.error_in_exec is None, r.error_in_exec
    return r.result


@pytest.fixture
def base(ip, clean_ns):
    run(ip, "import copy, numpy as np\ntorch.manual_seed(0)\nbatch_size = 8\n")


def _search(ip, body):
    res = run(ip, SEARCH + body)
    assert isinstance(res, BatchSearchResult)
    assert res.max_batch_size is not None
    return res


@pytest.mark.slow  # a whole search in the shell
def test_a_plain_tensor_parameter_and_its_optimizer_come_back(ip, base):
    run(ip, """
w = torch.randn(32, 4, requires_grad=True)
opt = torch.optim.SGD([w], lr=0.5, momentum=0.9)
(torch.randn(2, 32) @ w).pow(2).mean().backward(); opt.step()
w_before, grad_before = w.detach().clone(), w.grad.clone()
mom_before = opt.state[w]['momentum_buffer'].clone()
""")
    res = _search(ip, """
for _ in range(10):
    loss = (torch.randn(batch_size, 32) @ w).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
""")
    ns = ip.user_ns
    assert torch.equal(ns["w"].detach(), ns["w_before"])
    assert torch.equal(ns["w"].grad, ns["grad_before"])
    assert torch.equal(ns["opt"].state[ns["w"]]["momentum_buffer"], ns["mom_before"])
    assert ns["batch_size"] == 8
    assert not [n for n in res.notes if "could not" in n]


@pytest.mark.slow  # a whole search in the shell
def test_a_manual_update_under_no_grad_comes_back(ip, base):
    run(ip, "w = torch.randn(32, 4, requires_grad=True)\nw_before = w.detach().clone()\n")
    _search(ip, """
for _ in range(10):
    loss = (torch.randn(batch_size, 32) @ w).pow(2).mean()
    loss.backward()
    with torch.no_grad():
        w -= 0.1 * w.grad
        w.grad.zero_()
""")
    assert torch.equal(ip.user_ns["w"].detach(), ip.user_ns["w_before"])
    assert ip.user_ns["w"].grad is None


@pytest.mark.slow  # a whole search in the shell
def test_a_model_reached_through_an_attribute_comes_back_with_its_optimizer(ip, base):
    run(ip, """
class Holder: pass
h = Holder()
h.m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
h.opt = torch.optim.Adam(h.m.parameters(), 1e-2)
h.m(torch.randn(2, 32)).sum().backward(); h.opt.step()
m_before = copy.deepcopy(h.m.state_dict()); opt_before = copy.deepcopy(h.opt.state_dict())
""")
    _search(ip, """
for _ in range(10):
    loss = h.m(torch.randn(batch_size, 32)).pow(2).mean()
    h.opt.zero_grad(); loss.backward(); h.opt.step()
""")
    ns = ip.user_ns
    assert all(torch.equal(v, ns["m_before"][k]) for k, v in ns["h"].m.state_dict().items())
    now = ns["h"].opt.state_dict()["state"]
    assert all(torch.equal(now[i]["exp_avg"], s["exp_avg"]) and int(now[i]["step"]) == int(s["step"])
               for i, s in ns["opt_before"]["state"].items())


@pytest.mark.slow  # a whole search in the shell
def test_a_model_only_a_cache_holds_comes_back(ip, base):
    # nothing in the namespace reaches the model: only the log of writes can put it back
    run(ip, """
import functools
@functools.lru_cache(None)
def parts():
    m = nn.Linear(32, 4)
    return m, torch.optim.SGD(m.parameters(), lr=0.5)
before = parts()[0].weight.detach().clone()
""")
    _search(ip, """
m, o = parts()
for _ in range(10):
    loss = m(torch.randn(batch_size, 32)).pow(2).mean()
    o.zero_grad(); loss.backward(); o.step()
""")
    assert torch.equal(ip.user_ns["parts"]()[0].weight.detach(), ip.user_ns["before"])


@pytest.mark.slow  # a whole search in the shell
def test_a_model_in_a_closure_comes_back(ip, base):
    run(ip, """
def make():
    model = nn.Linear(32, 4)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    def step(x):
        loss = model(x).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        return loss
    return step
step = make()
step(torch.randn(2, 32))
def cells():  # no name of the namespace holds the model or the optimizer
    return {type(c.cell_contents).__name__: c.cell_contents for c in step.__closure__}
before = copy.deepcopy(cells()['Linear'].state_dict())
steps_before = [int(s['step']) for s in cells()['Adam'].state.values()]
""")
    _search(ip, "for _ in range(10):\n    step(torch.randn(batch_size, 32))\n")
    cells = ip.user_ns["cells"]()
    assert all(torch.equal(v, ip.user_ns["before"][k]) for k, v in cells["Linear"].state_dict().items())
    assert [int(s["step"]) for s in cells["Adam"].state.values()] == ip.user_ns["steps_before"]


LOOP = """
for _ in range(10):
    loss = model(torch.randn(batch_size, 32)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
"""
MODEL = """
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
before = copy.deepcopy(model.state_dict())
def same():
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
"""


SCRIPT = """
import warnings
with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)  # torch 2.13 deprecates TorchScript
    {}
"""


@pytest.mark.slow  # a whole search in the shell
def test_a_torchscript_module_in_the_namespace_does_not_stop_the_restore(ip, base):
    run(ip, MODEL + SCRIPT.format("scripted = torch.jit.script(nn.Linear(2, 2))"))
    res = _search(ip, LOOP)
    assert ip.user_ns["same"]()
    assert ip.user_ns["batch_size"] == 8
    assert "loss" not in ip.user_ns
    assert not [n for n in res.notes if "restore" in n or "put back" in n]


@pytest.mark.slow  # a whole search in the shell
def test_a_trained_torchscript_module_comes_back(ip, base):
    run(ip, SCRIPT.format("model = torch.jit.script(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)))")
        + """
opt = torch.optim.SGD(model.parameters(), lr=0.1)
before = [p.detach().clone() for p in model.parameters()]
""")
    _search(ip, LOOP)
    assert all(torch.equal(p.detach(), b) for p, b in zip(ip.user_ns["model"].parameters(), ip.user_ns["before"],
                                                           strict=True))


@pytest.mark.slow  # a whole search in the shell
def test_flags_hooks_attributes_and_param_groups_the_cell_adds_are_undone(ip, base):
    run(ip, MODEL + "extra = nn.Parameter(torch.zeros(3))\n")
    _search(ip, """
model[0].requires_grad_(False)
model.register_forward_hook(lambda *a: None)
opt.register_step_post_hook(lambda *a: None)
model.epoch = 3
if len(opt.param_groups) == 1:
    opt.add_param_group({'params': [extra], 'lr': 0.5})
opt.param_groups[0]['lr'] = 9.0
model.eval()
import torch.optim.optimizer as optmod
torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
optmod.register_optimizer_step_pre_hook(lambda *a: None)
""" + LOOP)
    ns = ip.user_ns
    model, opt = ns["model"], ns["opt"]
    assert all(p.requires_grad for p in model.parameters())
    assert not model._forward_hooks
    assert not opt._optimizer_step_post_hooks
    assert not hasattr(model, "epoch")
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["lr"] == 0.1
    assert all(m.training for m in model.modules())
    import torch.optim.optimizer as optmod

    assert not torch.nn.modules.module._global_forward_hooks
    assert not optmod._global_optimizer_pre_hooks
    assert ns["same"]()


@pytest.mark.slow  # a whole search in the shell
def test_numpy_arrays_objects_and_generators_come_back(ip, base):
    run(ip, MODEL + """
arr = np.arange(5.0)
class Tk: pass
tk = Tk(); tk.count = 0; tk.vals = []
g = torch.Generator().manual_seed(1)
rs = np.random.default_rng(3)
g_state = g.get_state().clone(); rs_next = copy.deepcopy(rs).random()
""")
    _search(ip, """
arr += 1
tk.count += 1
x = torch.randn(batch_size, 32, generator=g) + float(rs.random())
""" + LOOP.replace("torch.randn(batch_size, 32)", "x") + "    tk.vals.append(loss.item())\n")
    ns = ip.user_ns
    assert ns["arr"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert ns["tk"].count == 0
    assert ns["tk"].vals == []
    assert torch.equal(ns["g"].get_state(), ns["g_state"])
    assert ns["rs"].random() == ns["rs_next"]


@pytest.mark.slow  # a whole search in the shell
def test_process_wide_settings_come_back(ip, base, tmp_path):
    import logging
    import os
    import warnings

    state = (torch.get_num_threads(), torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(),
             torch.get_default_dtype(), list(warnings.filters), logging.getLogger("gpumagic.test").level,
             os.environ.get("GPUMAGIC_RESTORE_TEST"), os.getcwd())
    run(ip, MODEL)
    _search(ip, f"""
import logging, os, warnings
torch.set_num_threads(1)
torch.backends.cudnn.benchmark = True
torch.set_float32_matmul_precision('medium')
torch.set_default_dtype(torch.float64)
warnings.simplefilter('ignore')
logging.getLogger('gpumagic.test').setLevel(logging.ERROR)
os.environ['GPUMAGIC_RESTORE_TEST'] = '1'
os.chdir({str(tmp_path)!r})
""" + LOOP.replace("torch.randn(batch_size, 32)", "torch.randn(batch_size, 32, dtype=torch.float32)"))
    after = (torch.get_num_threads(), torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(),
             torch.get_default_dtype(), list(warnings.filters), logging.getLogger("gpumagic.test").level,
             os.environ.get("GPUMAGIC_RESTORE_TEST"), os.getcwd())
    assert after == state


@pytest.mark.slow  # a whole search in the shell
def test_a_resized_tensor_comes_back_to_its_size(ip, base):
    run(ip, MODEL + "buf = torch.empty(0)\n")
    _search(ip, "buf.resize_(1000)\n" + LOOP)
    assert ip.user_ns["buf"].shape == (0,)


@pytest.mark.slow  # a whole search in the shell
def test_a_tensor_whose_data_is_replaced_comes_back(ip, base):
    run(ip, MODEL + "w = torch.ones(4)\n")
    _search(ip, "w.data = torch.zeros(7)\nw.add_(1)\n" + LOOP)
    assert torch.equal(ip.user_ns["w"], torch.ones(4))


@pytest.mark.slow
def test_the_api_puts_back_a_closure_model_it_cannot_find(clean_ns):
    import gpumagic

    model = torch.nn.Linear(32, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model.weight.detach().clone()
    log = []

    def trial(b):
        for _ in range(10):
            loss = model(torch.randn(b, 32)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            log.append(loss.item())

    gpumagic.find_batch(trial, device="cpu", budget="24MiB", max_size=256, progress=False, restore=[])
    assert torch.equal(model.weight.detach(), before)
    assert log == []


def test_snapshot_runs_a_callable_twice_from_the_same_state():
    from gpumagic.state import Snapshot

    model = torch.nn.Linear(4, 4)
    seen = []
    snap = Snapshot.take(roots=[model])

    def train():
        with torch.no_grad():
            model.weight.mul_(2)
        model.tag = "x"
        seen.append(model.weight.sum().item())

    for _ in range(2):
        _, problems = snap.run(train)
        assert problems == []
    assert seen[0] == seen[1]
    assert not hasattr(model, "tag")


def test_a_failing_item_is_named_and_the_others_still_come_back():
    import numpy as np

    from gpumagic.state import Snapshot

    arr = np.zeros(3)
    log = [1]
    snap = Snapshot.take(roots=[arr, log])
    arr.dtype = np.int64  # same bytes, another dtype: the saved values cannot be written back as they were
    log.append(2)
    problems = snap.restore()
    assert log == [1]
    assert len(problems) == 1
    assert "ndarray" in problems[0]
    assert "dtype" in problems[0]


def test_a_deque_comes_back_in_place():
    from collections import deque

    from gpumagic.state import Snapshot

    seen = deque([1])
    snap = Snapshot.take(namespace={"seen": seen})
    seen.append(2)
    assert snap.restore() == []
    assert list(seen) == [1]


def test_an_object_with_slots_comes_back():
    from gpumagic.state import Snapshot

    class Point:
        __slots__ = ("x", "y")

    p = Point()
    p.x = 1
    snap = Snapshot.take(roots=[p])
    p.x = 2
    p.y = 3
    assert snap.restore() == []
    assert p.x == 1
    assert not hasattr(p, "y")


def test_a_write_the_log_did_not_see_is_named():
    from gpumagic.state import Snapshot

    t = torch.zeros(3)
    snap = Snapshot.take(roots=[t])
    t.add_(1)  # not under recording(): as inside torch.compile'd code, the log cannot see it
    problems = snap.restore()
    assert len(problems) == 1
    assert "not restored: 1 tensor" in problems[0]
    assert snap.restore() == []  # named once, for the run that wrote it


def test_a_write_under_the_log_is_put_back_without_a_note():
    from gpumagic.state import Snapshot

    t = torch.zeros(3)
    snap = Snapshot.take(roots=[t])
    with snap.recording():
        t.add_(1)
    assert snap.restore() == []
    assert torch.equal(t, torch.zeros(3))


def test_a_graph_recorded_before_still_runs_backward_after_a_restore():
    from gpumagic.state import Snapshot

    w = torch.randn(3, requires_grad=True)
    loss = (w * w).sum()  # saves w for backward
    snap = Snapshot.take(roots=[w])
    with snap.recording(), torch.no_grad():
        w.add_(1)
    assert snap.restore() == []
    loss.backward()  # "modified by an inplace operation" if the version counter stayed moved
    assert torch.equal(w.grad, 2 * w.detach())


@pytest.mark.slow  # a whole search in the shell
def test_a_loss_from_an_earlier_cell_still_runs_backward_after_a_search(ip, base):
    run(ip, MODEL + "old_loss = model(torch.randn(4, 32)).pow(2).mean()\n")
    _search(ip, LOOP)
    run(ip, "old_loss.backward()\n")


DRY = "%%gpumem --dry-run -d cuda --budget 1GiB\n"


@pytest.mark.slow  # a whole search in the shell
def test_a_dry_run_leaves_lists_objects_and_arrays_as_they_were(ip, base):
    run(ip, MODEL + """
arr = np.arange(3.0)
class Tk: pass
tk = Tk(); tk.vals = []
""")
    run(ip, DRY + "arr += 1\ntk.flag = True\n" + LOOP + "    tk.vals.append(loss.item())\n")
    ns = ip.user_ns
    assert ns["tk"].vals == []
    assert not hasattr(ns["tk"], "flag")
    assert ns["arr"].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.slow  # a whole search in the shell
def test_a_planned_search_leaves_lists_and_arrays_as_they_were(ip, base):
    run(ip, MODEL + "arr = np.arange(3.0)\nclass Tk: pass\ntk = Tk(); tk.vals = []\n")
    with capture_output():
        r = ip.run_cell("%%find_batch --dry-run --var batch_size -d cpu --budget 64MiB --max 256\n"
                        "arr += 1\n" + LOOP + "    tk.vals.append(loss.item())\n", store_history=True)
    assert r.error_in_exec is None
    assert ip.user_ns["tk"].vals == []
    assert ip.user_ns["arr"].tolist() == [0.0, 1.0, 2.0]
