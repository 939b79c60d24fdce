"""The OOM heuristics as pure functions of a namespace and a cell's source: no shell (issue 20, §1)."""

import torch
from torch.utils.data import DataLoader, TensorDataset

from gpumagic.oom.context import freed_by_deleting, measured_the_failing_device, names_used

CPU = torch.device("cpu")


def test_names_used_reaches_the_globals_a_called_function_reads():
    def get_batch():
        return batch_size  # noqa: F821

    assert "batch_size" in names_used({"get_batch": get_batch}, "x = get_batch()")


def test_deleting_tensors_a_dataset_also_holds_frees_nothing():
    X, Y = torch.randn(1000, 64), torch.randint(0, 10, (1000,))
    ns = {"X": X, "Y": Y, "data": TensorDataset(X, Y)}
    assert freed_by_deleting(ns, ["X", "Y"], CPU) == []


def test_a_dataloader_holds_its_datasets_tensors_too():
    X = torch.randn(1000, 64)
    ns = {"X": X, "loader": DataLoader(TensorDataset(X), batch_size=10)}
    assert freed_by_deleting(ns, ["X"], CPU) == []


def test_a_tensor_nothing_else_holds_is_freed_in_full():
    ns = {"emb": torch.zeros(1024), "other": torch.zeros(8)}
    assert freed_by_deleting(ns, ["emb"], CPU) == [("emb", 4096)]


def test_a_storage_two_candidates_share_is_claimed_by_neither():
    base = torch.zeros(1024)
    ns = {"a": base, "b": base[:10], "c": torch.zeros(4)}
    assert freed_by_deleting(ns, ["a", "b", "c"], CPU) == [("c", 16)]


def test_a_models_parameters_and_gradients_are_reached():
    model = torch.nn.Linear(16, 16)
    model(torch.randn(2, 16)).sum().backward()
    ns = {"model": model, "w": model.weight}
    assert freed_by_deleting(ns, ["w"], CPU) == []
    freed = dict(freed_by_deleting(ns, ["model"], CPU))
    assert freed == {"model": 2 * 16 * 4}  # the bias and its gradient: `w` holds the weight and its gradient


def test_a_closure_holding_a_tensor_keeps_it():
    t = torch.zeros(256)

    def f():
        return t

    assert freed_by_deleting({"t": t, "f": f}, ["t"], CPU) == []


class _Report:
    device = "cpu"


class _Info:
    def __init__(self, simulated):
        self.simulated = simulated


def test_a_report_measured_the_failing_device_only_when_they_match():
    assert measured_the_failing_device(_Info(False), _Report(), CPU)
    assert not measured_the_failing_device(_Info(False), _Report(), torch.device("meta"))
    assert measured_the_failing_device(_Info(True), _Report(), torch.device("meta"))
