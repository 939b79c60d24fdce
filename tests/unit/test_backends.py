"""A device added from one file: a backend registered here runs %%gpumem -d fake and a search on it.

The "fake" device is a 24 MiB accelerator whose memory is host memory, measured by the exact CPU
tracker with the device's capacity as its budget. Nothing else in gpumagic knows its name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import torch
from IPython.utils.capture import capture_output

from gpumagic import backends
from gpumagic.backends.cpu import CPUSource
from gpumagic.backends.cpu_exact import CPUSession
from gpumagic.devices import device_status, resolve, resolve_device
from gpumagic.report import BatchSearchResult, DeviceStatus, MemoryReport

MiB = 2**20
CAPACITY = 24 * MiB


class FakeSession(CPUSession):
    backend = "fake"

    def __init__(self, budget: int | None, exclude: Iterable[int]) -> None:
        super().__init__(CAPACITY if budget is None else min(budget, CAPACITY), exclude=exclude)
        self.device = "fake"


class FakeBackend:
    name = "fake"
    session_enforces_capacity = True

    def __init__(self) -> None:
        self.rng_restored: list[Any] = []

    def available(self) -> bool:
        return True

    def parse(self, index: int | None) -> torch.device:
        if index not in (None, 0):
            raise ValueError(f"device 'fake:{index}' does not exist")
        return torch.device("cpu")

    def owns(self, device: torch.device) -> bool:
        return False  # its tensors look like CPU tensors: never chosen by following a model

    def open_session(self, device: torch.device, budget: int | None, exclude: Iterable[int]) -> FakeSession:
        return FakeSession(budget, exclude)

    def status(self, device: torch.device) -> DeviceStatus:
        return DeviceStatus("fake", "fake", 0, None, CAPACITY, CAPACITY, "a fake accelerator")

    def capacity(self, device: torch.device) -> int | None:
        return CAPACITY

    def empty_cache(self) -> None:
        return None

    def rng_state(self) -> Any:
        return "fake-rng"

    def set_rng_state(self, state: Any) -> None:
        self.rng_restored.append(state)

    def sample_source(self) -> CPUSource | None:
        return None

    # no optional member (backends.OPTIONAL): register gives each its default


@pytest.fixture
def fake() -> Iterator[FakeBackend]:
    backend = FakeBackend()
    backends.register(backend)
    try:
        yield backend
    finally:
        backends.unregister("fake")


def test_a_registered_backend_is_resolved_by_its_name(fake: FakeBackend) -> None:
    assert resolve("fake") == (fake, torch.device("cpu"))


def test_register_gives_a_backend_the_defaults_of_the_members_it_lacks(fake: FakeBackend) -> None:
    got = backends.get("fake")
    assert got is fake
    assert (got.indexed, got.oom_device_types, got.dry_run, got.plans_on_fake_tensors, got.loader_pin_memory) == \
        (False, (), None, False, False)
    assert got.processes(torch.device("cpu")) == ()
    assert got.rank_device(0) is None


def test_register_keeps_the_optional_members_a_backend_defines() -> None:
    class Indexed(FakeBackend):
        name = "fake2"
        indexed = True

        def rank_device(self, local_rank: int) -> torch.device | None:
            return torch.device("cpu")

    backend = Indexed()
    backends.register(backend)
    try:
        assert backend.indexed is True
        assert backend.rank_device(1) == torch.device("cpu")
        assert backend.oom_device_types == ()  # the members it lacks still get their defaults
    finally:
        backends.unregister("fake2")


def test_register_refuses_a_backend_that_cannot_take_a_missing_member() -> None:
    class Bare:  # no __dict__: a missing member cannot be set on it
        __slots__ = ()
        name = "slotted"
        session_enforces_capacity = True

    bare = Bare()
    with pytest.raises(TypeError, match=r"'slotted' has no 'plans_on_fake_tensors'.*BackendBase"):
        backends.register(bare)  # type: ignore[arg-type]
    assert backends.get("slotted") is None


def test_the_builtin_backends_subclass_the_defaults() -> None:
    assert all(isinstance(b, backends.BackendBase) for b in backends.registry() if b.name in ("cuda", "mps", "cpu"))


def test_a_backend_registered_last_does_not_change_the_default_device(fake: FakeBackend) -> None:
    assert resolve()[0] is not fake


def test_unknown_device_error_names_every_registered_backend(fake: FakeBackend) -> None:
    with pytest.raises(ValueError, match="'fake'") as e:
        resolve_device("tpu")
    assert "'cpu'" in str(e.value)
    assert "'tpu'" in str(e.value)


def test_device_status_asks_the_backend(fake: FakeBackend) -> None:
    assert device_status("fake").name == "a fake accelerator"


def test_gpumem_cell_runs_on_the_fake_device(ip: Any, clean_ns: None, fake: FakeBackend) -> None:
    with capture_output():
        r = ip.run_cell("%%gpumem -d fake -o -q\nx = torch.zeros(2 * 2**20, dtype=torch.uint8)\ndel x")
    rep = r.result
    assert r.error_in_exec is None
    assert isinstance(rep, MemoryReport)
    assert (rep.backend, rep.device, rep.capacity_bytes) == ("fake", "fake", CAPACITY)
    assert rep.peak_delta_bytes == 2 * MiB


def test_find_batch_searches_the_fake_device_within_its_capacity(ip: Any, clean_ns: None, fake: FakeBackend) -> None:
    ip.run_cell(
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))\n"
        "opt = torch.optim.SGD(model.parameters(), 0.1)\n"
        "bs = 8"
    )
    loop = (
        "for _ in range(3):\n"
        "    loss = F.cross_entropy(model(torch.randn(bs, 256)), torch.randint(0, 10, (bs,)))\n"
        "    opt.zero_grad(); loss.backward(); opt.step()\n"
    )
    with capture_output():
        r = ip.run_cell("%%find_batch --var bs -d fake -o -q\n" + loop)
    res = r.result
    assert r.error_in_exec is None, r.error_in_exec
    assert isinstance(res, BatchSearchResult)
    assert res.device == "fake"
    assert res.capacity_bytes == CAPACITY
    assert res.oom_count >= 1  # the fake device's capacity, not the host's, bounded the search
    assert res.predicted_peak_bytes is not None
    assert res.predicted_peak_bytes <= CAPACITY
    assert fake.rng_restored  # the trial runner restored the fake device's RNG through the backend
