"""The trial runner and state snapshots behind find_batch (the search itself is in test_search.py)."""

import random
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset

from gpumagic import _shell, batch
from gpumagic.batch import Observed, StateSnapshot, TrialRunner, rebuild_loader

MiB = 2**20


def _trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    for _ in range(2):
        F.cross_entropy(model(torch.randn(4, 8)), torch.randint(0, 2, (4,))).backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _step(model, opt, sched, n=3):
    for _ in range(n):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 2, (16,))).backward()
        opt.step()
        sched.step()


def test_snapshot_restores_models_optimizers_schedulers_and_grads():
    model, opt, sched = _trained()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    exp_avg = opt.state_dict()["state"][0]["exp_avg"].clone()
    lr = opt.param_groups[0]["lr"]
    snap = StateSnapshot.take(batch.stateful_objects([model, sched]))
    with snap.recording():  # tensor values come back through the undo log of what ran under it
        _step(model, opt, sched)
    snap.restore()
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())  # BatchNorm buffers too
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=False))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], exp_avg)
    assert opt.param_groups[0]["lr"] == lr
    assert sched.last_epoch == 2


def test_snapshot_restores_train_and_eval_mode_of_every_module():
    model, _opt, sched = _trained()
    model[1].eval()  # a user's mixed state: one submodule frozen in eval mode
    snap = StateSnapshot.take(batch.stateful_objects([model, sched]))
    model.eval()  # what an evaluation trial's cell does
    snap.restore()
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_snapshot_restores_every_rng():
    snap = StateSnapshot.take([])
    expected = (torch.rand(3), random.random(), np.random.rand())
    snap.restore()
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_snapshot_restores_namespace_bindings_and_plain_values():
    model = nn.Linear(2, 2)
    ns = {"batch_size": 32, "log": [1.0, 2.0], "cfg": {"lr": 0.1}, "model": model, "best": 0.5}
    log = ns["log"]
    snap = StateSnapshot.take([], namespace=ns)
    ns["batch_size"] = 1024
    ns["log"].append(3.0)
    ns["cfg"]["lr"] = 9.0
    ns["model"] = nn.Linear(3, 3)
    ns["new_name"] = object()
    del ns["best"]
    snap.restore()
    assert ns == {"batch_size": 32, "log": [1.0, 2.0], "cfg": {"lr": 0.1}, "model": model, "best": 0.5}
    assert ns["log"] is log  # restored in place: other references see it too


def test_snapshot_tensors_are_excluded_from_the_device_baseline():
    model, opt, _sched = _trained()
    snap = StateSnapshot.take(batch.stateful_objects([model, opt]))
    assert snap.storage_keys  # host copies, which the cpu tracker must not count
    runner = TrialRunner(lambda b: None, device=torch.device("cpu"), budget=None, steps=1, snapshot=snap,
                         has_optimizer=True, observed=Observed())
    with_excl = runner(1)
    assert with_excl.peak_bytes is not None


def test_discovery_finds_optimizers_and_the_models_that_own_their_parameters():
    model, opt, sched = _trained()
    found = batch.discover_stateful()
    assert any(o is opt for o in found)
    assert any(o is model for o in found)
    assert any(o is sched for o in found)
    assert not any(o is model[0] for o in found)  # submodules restore with their parent


def _runner(body, steps=3, budget=None, has_optimizer=True, objects=()):
    snap = StateSnapshot.take(objects)
    return TrialRunner(body, device=torch.device("cpu"), budget=budget, steps=steps, snapshot=snap,
                       has_optimizer=has_optimizer, observed=Observed())


def test_a_trial_stops_after_k_optimizer_steps_even_inside_except_exception():
    model, opt, _sched = _trained()
    calls = []

    def body(b):
        for _ in range(100):
            try:
                calls.append(b)
                opt.zero_grad()
                F.cross_entropy(model(torch.randn(b, 8)), torch.randint(0, 2, (b,))).backward()
                opt.step()
            except Exception:  # a user's broad except must not swallow the stop
                pass

    trial = _runner(body, steps=3, objects=[model, opt])(8)
    assert len(calls) == 3
    assert trial.steps == 3
    assert not trial.oom
    assert trial.samples_per_second
    assert trial.samples_per_second > 0


def test_without_an_optimizer_backward_calls_are_counted():
    w = torch.ones(4, requires_grad=True)
    n = []

    def body(b):
        for _ in range(50):
            n.append(1)
            (w * b).sum().backward()

    trial = _runner(body, steps=4, has_optimizer=False)(2)
    assert len(n) == 4
    assert trial.steps == 4


def test_an_oom_trial_is_recorded_and_its_memory_freed():
    refs = []

    def body(b):
        held = []
        for _ in range(b):
            t = torch.empty(MiB, dtype=torch.uint8)
            refs.append(weakref.ref(t))
            held.append(t)

    runner = _runner(body, budget=16 * MiB)
    trial = runner(64)
    assert trial.oom
    assert trial.peak_bytes is None
    assert refs
    assert all(r() is None for r in refs)
    ok = runner(4)
    assert not ok.oom
    assert ok.peak_bytes is not None


def test_a_non_oom_error_stops_with_that_error_and_state_is_restored():
    model, opt, sched = _trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def body(b):
        _step(model, opt, sched, 1)
        raise ValueError("user bug")

    with pytest.raises(ValueError, match="user bug"):
        _runner(body, objects=batch.stateful_objects([model, opt, sched]))(4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_keyboard_interrupt_mid_trial_restores_state_and_propagates():
    model, opt, sched = _trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def body(b):
        _step(model, opt, sched, 1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _runner(body, objects=batch.stateful_objects([model, opt, sched]))(4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.autograd.backward.__module__ == "torch.autograd"


def test_rebuilt_loader_keeps_dataset_sampler_kind_and_options():
    ds = TensorDataset(torch.arange(100).float())
    shuffled = DataLoader(ds, batch_size=8, shuffle=True, drop_last=True)
    copy = rebuild_loader(shuffled, 32)
    assert copy.batch_size == 32
    assert copy.dataset is ds
    assert copy.drop_last
    assert isinstance(copy.sampler, RandomSampler)
    plain = rebuild_loader(DataLoader(ds, batch_size=8), 50)
    assert isinstance(plain.sampler, SequentialSampler)
    assert [len(b[0]) for b in plain] == [50, 50]


def test_rebuilding_a_loader_without_batch_size_is_refused():
    ds = TensorDataset(torch.arange(10).float())
    with pytest.raises(ValueError, match="batch_size=None"):
        rebuild_loader(DataLoader(ds, batch_size=None), 4)


def test_last_gpumem_cell_is_found_in_history():
    from types import SimpleNamespace

    hist = ["x = 1", "%%gpumem -d cpu\ntrain()\n", "y"]
    shell = SimpleNamespace(history_manager=SimpleNamespace(input_hist_raw=hist))
    assert _shell.last_gpumem_cell(shell) == "train()"
    shell.history_manager.input_hist_raw = ["x = 1"]
    assert _shell.last_gpumem_cell(shell) is None
