"""One rule for the variable a cell reads its batch size from (issue 20 §1, issue 19 §4)."""

import argparse

import pytest
from IPython.utils.capture import capture_output

from gpumagic.oom.context import batch_variable


def test_a_name_like_a_batch_size_is_the_batch():
    assert batch_variable({"batch_size": 64, "epochs": 3}, "train(batch_size, epochs)") == ("batch_size", 64)


def test_a_dict_item_is_the_batch():
    assert batch_variable({"cfg": {"bs": 64, "lr": 3}}, "idx = torch.randint(0, 9, (cfg['bs'],))") == \
        ("cfg['bs']", 64)


def test_an_attribute_of_parsed_arguments_is_the_batch():
    args = argparse.Namespace(batch_size=32, epochs=2)
    assert batch_variable({"args": args}, "x = X[:args.batch_size]") == ("args.batch_size", 32)


def test_a_plain_name_is_the_batch_when_the_steps_consumed_its_value():
    assert batch_variable({"n": 48, "steps": 3}, "for i in range(steps):\n    f(X[:n])", observed=48) == ("n", 48)


def test_a_plain_name_is_not_the_batch_without_an_observed_size():
    assert batch_variable({"n": 48}, "f(X[:n])") is None


def test_the_observed_size_wins_over_a_batch_like_name_with_another_value():
    ns = {"batch_size": 256, "micro": 64}
    assert batch_variable(ns, "loader = make(micro); acc = batch_size // micro", observed=64) == ("micro", 64)


def test_two_names_with_the_observed_value_fall_back_to_the_batch_like_one():
    assert batch_variable({"bs": 16, "width": 16}, "f(bs, width)", observed=16) == ("bs", 16)


def test_a_module_attribute_is_no_batch_size():
    import torch

    assert batch_variable({"torch": torch}, "x = torch.float16", observed=16) is None


SETUP = """
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
X = torch.randn(4096, 64); Y = torch.randint(0, 10, (4096,))
model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
opt = torch.optim.SGD(model.parameters(), 0.1)
cfg = {'bs': 4096, 'lr': 0.1}
"""
CELL = """%%gpumem -d cpu --budget 4MiB -q
for i in range(3):
    idx = torch.randint(0, len(X), (cfg['bs'],))
    loss = F.cross_entropy(model(X[idx]), Y[idx])
    opt.zero_grad(); loss.backward(); opt.step()
"""


@pytest.fixture
def forget(ip, clean_ns):
    p = ip.magics_manager.registry["GPUMagics"].presenter
    p.last_report = p.last_search = p.last_search_code = p.last_oom_cell = None
    yield p
    p.last_report = p.last_search = p.last_search_code = p.last_oom_cell = None


def test_a_batch_size_in_a_config_dict_gets_batch_advice(ip, forget):
    with capture_output():
        ip.run_cell(SETUP)
        r = ip.run_cell(CELL, store_history=True)
    advice = r.error_in_exec.advice
    assert advice.suggestions[0].kind != "allocation"
    assert any("(now 4096): set cfg['bs']" in s.title or s.kind == "bound" for s in advice.suggestions)
