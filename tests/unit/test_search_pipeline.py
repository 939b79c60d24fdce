"""One search pipeline: options checked once (SearchOptions), errors that name fields and that each
edge spells its own way, progress chosen in one place, and the two forms of the search (the
Python API and the magics' namespace form) behaving alike because they share search_target."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gpumagic
from gpumagic import batch, magics
from gpumagic.options import BadOptions, SearchOptions, parse_budget

MiB = 2**20
SEEN: list[str] = []  # a module global, out of a search's reach (it puts back what the trial's closure reaches)


def test_the_budget_is_parsed_once_into_bytes():
    assert SearchOptions(budget=parse_budget("96MiB")).budget == 96 * MiB
    assert SearchOptions(budget=96 * MiB).budget == 96 * MiB
    with pytest.raises(BadOptions) as e:
        parse_budget("96 furlongs")
    assert str(e.value).startswith("budget must be a number with a unit")
    assert e.value.spelled(magics.FLAGS).startswith("--budget must be a number with a unit")


@pytest.mark.parametrize(
    ("fields", "python", "flags"),
    [
        ({"min_size": 8, "max_size": 4}, "min_size (8) is larger than max_size (4)",
         "--min (8) is larger than --max (4)"),
        ({"steps": 0}, "steps must be >= 1, got 0", "--steps must be >= 1, got 0"),
        ({"margin": 0.7}, "margin must be in [0, 0.5), got 0.7", "--margin must be in [0, 0.5), got 0.7"),
        ({"gpu": "T4", "budget": MiB}, "give either a GPU (gpu) or a budget (budget), not both",
         "give either a GPU (--gpu) or a budget (--budget), not both"),
        ({"effective": 0}, "effective must be >= 1, got 0", "--effective must be >= 1, got 0"),
    ],
)
def test_a_fault_names_the_field_and_each_edge_spells_it(fields, python, flags):
    e = SearchOptions.checked(**fields)
    assert isinstance(e, BadOptions)
    assert isinstance(e, ValueError)
    assert str(e) == python
    assert e.spelled(magics.FLAGS) == flags


def test_every_option_the_magic_sets_has_its_flag():
    # by construction: a new field the magic passes cannot be spelled as a Python name in a UsageError
    api_only = {"dataset_size", "plan_first", "timeout_s"}
    fields = {f.name for f in dataclasses.fields(SearchOptions)} - api_only
    assert fields <= set(magics.FLAGS), fields - set(magics.FLAGS)


def test_the_pure_search_and_the_options_use_one_validator():
    from gpumagic.search import search

    with pytest.raises(BadOptions) as pure:
        search(lambda b: None, capacity_bytes=MiB, min_size=8, max_size=4)
    assert str(pure.value) == str(SearchOptions.checked(min_size=8, max_size=4))


def _tiny():
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))

    def train(b):
        for i in range(0, 64, b):
            loss = F.cross_entropy(model(x[i:i + b]), y[i:i + b])
            opt.zero_grad()
            loss.backward()
            opt.step()

    return model, opt, train


def test_the_api_refuses_bad_bounds_before_any_trial():
    calls = []
    with pytest.raises(BadOptions, match=r"^min_size \(8\) is larger than max_size \(4\)$"):
        gpumagic.find_batch(lambda b: calls.append(b), budget="8MiB", min_size=8, max_size=4, progress=False)
    assert calls == []


def test_the_magic_refuses_the_same_bounds_in_its_flags(ip, clean_ns):
    _model, _opt, train = _tiny()
    ip.push({"train": train, "bs": 4})
    with capture_output():
        r = ip.run_cell("%find_batch --var bs -d cpu --budget 8MiB --min 8 --max 4 -- train(bs)")
    assert isinstance(r.error_in_exec, UsageError)
    assert str(r.error_in_exec) == "--min (8) is larger than --max (4)"


def test_an_unknown_progress_kind_is_refused_naming_the_kinds_before_any_trial():
    calls = []
    with pytest.raises(BadOptions, match=r"progress 'fancy' is no progress kind; the kinds are .*'text'"):
        gpumagic.find_batch(lambda b: calls.append(b), budget="8MiB", progress="fancy")
    assert calls == []


def test_progress_text_reports_every_trial_on_stderr(capfd):
    _model, _opt, train = _tiny()
    res = gpumagic.find_batch(train, device="cpu", budget="2MiB", max_size=64, progress="text")
    err = capfd.readouterr().err
    assert err.count("find_batch: trial") == len(res.trials), err


def test_a_callable_progress_hears_every_trial():
    _model, _opt, train = _tiny()
    heard = []
    res = gpumagic.find_batch(train, device="cpu", budget="2MiB", max_size=64,
                              progress=lambda t, i: heard.append((t.batch_size, i)))
    assert [b for b, _ in heard] == [t.batch_size for t in res.trials]
    assert [i for _, i in heard] == list(range(len(res.trials)))


def test_an_api_dry_run_with_a_loader_gives_the_trial_loader_copies():
    # the pipeline is shared: what the loader option does in a real search it does in a dry run
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    loader = DataLoader(TensorDataset(torch.randn(256, 8), torch.randint(0, 2, (256,))), batch_size=4)
    SEEN.clear()

    def train(dl):
        SEEN.append(type(dl).__name__)
        for x, y in dl:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    res = gpumagic.find_batch(train, loader=loader, dry_run=True, device="cpu", budget="64MiB", progress=False,
                              namespace={})
    assert res.dry_run
    assert SEEN
    assert set(SEEN) == {"DataLoader"}
    assert loader.batch_size == 4


def test_both_forms_find_the_same_size(ip, clean_ns):
    model, opt, train = _tiny()
    api = gpumagic.find_batch(train, device="cpu", budget="2MiB", max_size=64, progress=False, restore=[model, opt])
    ip.push({"train": train, "bs": 4, "model": model, "opt": opt})
    with capture_output():
        r = ip.run_cell("%find_batch --var bs -d cpu --budget 2MiB --max 64 -q -o -- train(bs)")
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result.max_batch_size == api.max_batch_size


def test_the_namespace_form_takes_its_options_as_one_object(ip, clean_ns):
    model, opt, train = _tiny()
    ns = {"train": train, "bs": 4, "model": model, "opt": opt}
    opts = SearchOptions(device="cpu", budget=parse_budget("2MiB"), max_size=64)

    def run():
        exec("train(bs)", ns)

    res = batch.find_batch_in_namespace(ns, run, "train(bs)", opts=opts, var="bs", progress=False)
    assert res.max_batch_size is not None
    assert ns["bs"] == 4


SETUP_BIG = """
import torch, torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
big = torch.zeros(2**20)
model = nn.Linear(8, 2)
opt = torch.optim.SGD(model.parameters(), 0.1)
X, Y = torch.randn(64, 8), torch.randint(0, 2, (64,))
train_loader = DataLoader(TensorDataset(X, Y), batch_size=4)
def train(bs):
    loss = F.cross_entropy(model(X[:bs]), Y[:bs])
    loss.backward(); opt.step()
    raise ValueError("the user's own error")
"""


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("%find_batch --var bs -d cpu --budget 64MiB -q -- train(bs)", ValueError),
        ("%find_batch --loader train_loader --size-fn 'list(range(3))' -d cpu --budget 64MiB -q -- train(4)",
         UsageError),
    ],
)
def test_a_failed_search_keeps_nothing_of_the_user_alive(ip, clean_ns, line, error):
    # the error's traceback (IPython keeps the last one) holds the search's frames: they must not
    # hold the snapshot's copies, which reach every value the namespace had
    import gc
    import weakref

    assert ip.run_cell(SETUP_BIG + "bs = 4\n").error_in_exec is None
    with capture_output():
        r = ip.run_cell(line)
    assert isinstance(r.error_in_exec, error), r.error_in_exec
    ref = weakref.ref(ip.user_ns["big"])
    del ip.user_ns["big"]
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": 0}, "steps must be >= 1, got 0"),
        ({"budget": "3 parsecs"}, "budget must be a number with a unit"),
        ({"device": torch.device("cpu")}, "a plan needs device as a string"),
        ({"gpu": "T4", "budget": "1GiB"}, "give either a GPU (gpu) or a budget (budget) for a dry run"),
    ],
)
def test_every_way_to_plan_checks_its_options_alike(options, message):
    def train():
        pass

    entry_points = [
        lambda: gpumagic.track(dry_run=True, namespace={}, **options),
        lambda: gpumagic.track(what_if=True, namespace={}, **options),
        lambda: gpumagic.what_if(train, namespace={}, **options),
    ]
    for enter in entry_points:
        with pytest.raises(BadOptions) as e:
            enter()
        assert str(e.value).startswith(message)
