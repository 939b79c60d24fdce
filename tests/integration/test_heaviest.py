"""Variable-length data in a real IPython shell: heaviest-batch trials for --loader, the fit
against input size for --var, per-step input sizes in %%gpumem, and --eval trials."""

import re

import pytest
import torch
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from gpumagic.heaviest import MEASURE_ALL, measure, sample_sizes
from gpumagic.report import BatchSearchResult, MemoryReport

BUDGET = "4MiB"
TRAIN = """
for x, y in loader:
    Seen.lengths.append(x.shape[1])
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
"""


def run(ip, src):
    return ip.run_cell(src, store_history=True)


@pytest.fixture
def texts(ip, clean_ns):
    """400 token sequences of 4-23 tokens and four of 128, padded per batch; a small classifier."""
    r = run(ip, """
from collections import deque
from torch.utils.data import DataLoader, Dataset, IterableDataset, SubsetRandomSampler, TensorDataset
class Texts(Dataset):
    def __init__(self, lens):
        g = torch.Generator().manual_seed(1)
        self.items = [torch.randint(1, 100, (int(n),), generator=g) for n in lens]
    def __len__(self):
        return len(self.items)
    def __getitem__(self, i):
        return self.items[i], i % 2
def pad(batch):
    xs, ys = zip(*batch)
    return nn.utils.rnn.pad_sequence(list(xs), batch_first=True), torch.tensor(ys)
class Clf(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.ff = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
        self.out = nn.Linear(16, 2)
    def forward(self, x):
        return self.out(self.ff(self.emb(x)).mean(1))
g = torch.Generator().manual_seed(0)
lens = torch.randint(4, 24, (400,), generator=g)
lens[::100] = 128
ds = Texts(lens)
torch.manual_seed(0)
model = Clf()
opt = torch.optim.Adam(model.parameters(), 1e-3)
loader = DataLoader(ds, batch_size=8, shuffle=True, collate_fn=pad)
class Seen:  # a class attribute: a search puts back every container the namespace's values reach
    lengths = deque()
""")
    assert r.error_in_exec is None
    return ip


def find(ip, line, body=TRAIN):
    with capture_output():
        r = run(ip, f"%%find_batch {line} -d cpu --budget {BUDGET} -o\n{body}")
    assert r.error_in_exec is None, r.error_in_exec
    assert isinstance(r.result, BatchSearchResult)
    return r.result


def test_loader_trials_draw_only_batches_holding_the_longest_sample(texts):
    # lengths 100-127 and one of 128: no long tail, so no trial on the lightest 99% either
    run(texts, "ds = Texts(torch.randint(100, 128, (300,), generator=g)); ds.items[7] = torch.ones(128).long()\n"
               "loader = DataLoader(ds, batch_size=8, shuffle=True, collate_fn=pad)")
    res = find(texts, "--loader loader")
    assert res.recommended_batch_size is not None
    assert res.sample_sizes.advice == ()
    assert set(texts.user_ns["Seen"].lengths) == {128}


def test_loader_result_states_the_distribution_and_the_tail_gain(texts):
    res = find(texts, "--loader loader")
    ss = res.sample_sizes
    assert ss is not None
    assert ss.largest == 129  # 128 tokens and the label
    assert ss.p99 < 30
    assert ss.measured == ss.total == 400
    assert ss.p99_batch_size is not None
    assert ss.p99_batch_size > 2 * res.recommended_batch_size
    assert ss.advice[0].startswith("Length bucketing changes the answer")
    assert f"limits the batch to {res.recommended_batch_size}" in res._repr_html_()


def test_a_shuffled_epoch_at_the_pick_does_not_run_out_of_memory(texts):
    rec = find(texts, "--loader loader").recommended_batch_size
    texts.user_ns["rec"] = rec
    with capture_output():
        r = run(texts, f"%%gpumem -d cpu --budget {BUDGET} -o\n"
                       "torch.manual_seed(3)\n"
                       "for x, y in DataLoader(ds, batch_size=rec, shuffle=True, collate_fn=pad):\n"
                       "    loss = F.cross_entropy(model(x), y)\n"
                       "    opt.zero_grad(); loss.backward(); opt.step()\n")
    assert r.error_in_exec is None
    assert isinstance(r.result, MemoryReport)
    assert r.result.total_steps == -(-400 // rec)


def test_the_length_bucketing_snippet_runs_an_epoch_within_the_budget(texts):
    res = find(texts, "--loader loader")
    snippet = res.sample_sizes.advice[0].split(":\n", 1)[1]
    with capture_output():
        r = run(texts, f"%%gpumem -d cpu --budget {BUDGET} -o\nfrom gpumagic.heaviest import sample_sizes\n"
                       + snippet.replace("train_loader", "loader") + "\n"
                       "for x, y in loader:\n"
                       "    loss = F.cross_entropy(model(x), y)\n"
                       "    opt.zero_grad(); loss.backward(); opt.step()\n")
    assert r.error_in_exec is None
    assert r.result.total_steps < -(-400 // res.recommended_batch_size)


def test_loader_without_collate_fn_measures_tensor_elements_and_has_no_tail(ip, clean_ns):
    run(ip, """
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
data = TensorDataset(torch.randn(512, 32), torch.randint(0, 4, (512,)))
model = nn.Linear(32, 4)
opt = torch.optim.SGD(model.parameters(), 0.1)
loader = DataLoader(data, batch_size=16, shuffle=True)
""")
    body = ("for x, y in loader:\n    loss = F.cross_entropy(model(x), y)\n"
            "    opt.zero_grad(); loss.backward(); opt.step()\n")
    with capture_output():
        r = run(ip, "%%find_batch --loader loader -d cpu --budget 2MiB -o\n" + body)
    ss = r.result.sample_sizes
    assert ss.measure == "elements of each sample's tensors"
    assert ss.largest == ss.p99 == 33
    assert ss.advice == ()


def test_loader_with_a_sampler_measures_only_the_indices_it_draws(texts):
    run(texts, "loader = DataLoader(ds, batch_size=8, sampler=SubsetRandomSampler(range(1, 100)), "
               "collate_fn=pad, drop_last=True)")
    res = find(texts, "--loader loader")
    assert res.sample_sizes.largest < 129  # index 0, the long one, is not in the subset
    assert res.sample_sizes.measured == 99
    assert max(texts.user_ns["Seen"].lengths) < 128


def test_size_fn_names_the_measure_used(texts):
    run(texts, "token_counts = [len(t) for t in ds.items]")
    res = find(texts, "--loader loader --size-fn token_counts")
    assert res.sample_sizes.measure == "the given sizes"
    assert res.sample_sizes.largest == 128


def test_size_fn_of_the_wrong_length_is_a_usage_error(texts):
    with pytest.raises(UsageError, match=r"--size-fn 'lens\[:10\]'.*10 sizes for a data set of 400"):
        texts.run_cell_magic("find_batch", f"--loader loader --size-fn lens[:10] -d cpu --budget {BUDGET}", TRAIN)


def test_iterable_dataset_says_no_heaviest_search_and_falls_back(texts):
    run(texts, """
class Stream(IterableDataset):
    def __iter__(self):
        return iter(ds[i] for i in torch.randperm(len(ds)).tolist())
loader = DataLoader(Stream(), batch_size=8, collate_fn=pad)
""")
    res = find(texts, "--loader loader --steps 4")
    assert res.sample_sizes is None
    assert any("IterableDataset" in n and "no heaviest-batch search" in n for n in res.notes)


def test_var_with_varying_inputs_warns_and_predicts_the_longest_sample(texts):
    body = "loader = DataLoader(ds, batch_size=bs, shuffle=True, collate_fn=pad)\n" + TRAIN
    run(texts, "bs = 8")
    res = find(texts, "--var bs --steps 4", body)
    vi = res.variable_inputs
    assert vi is not None
    assert vi.largest_elements > 1.1 * vi.smallest_elements
    assert vi.worst_source.startswith("the data set's")
    assert vi.surviving_batch_size is not None
    assert res.recommended_batch_size <= vi.surviving_batch_size
    assert any("input sizes varied" in n for n in res.notes)


def test_gpumem_records_the_input_elements_of_each_step(texts):
    with capture_output():
        r = run(texts, f"%%gpumem -d cpu --budget {BUDGET} -o\n"
                       "for i, (x, y) in enumerate(DataLoader(ds, batch_size=4, collate_fn=pad)):\n"
                       "    loss = F.cross_entropy(model(x), y)\n"
                       "    opt.zero_grad(); loss.backward(); opt.step()\n"
                       "    if i == 2: break\n")
    steps = r.result.steps
    expected = [4 * max(len(t) for t in texts.user_ns["ds"].items[4 * i: 4 * i + 4]) + 4 for i in range(3)]
    assert [s.input_elements for s in steps] == expected


def test_per_step_view_plots_peak_against_input_size(texts):
    pytest.importorskip("matplotlib")
    from gpumagic.render.widgets import memory_figure

    with capture_output():
        r = run(texts, f"%%gpumem -d cpu --budget {BUDGET} -o -q\n"
                       "for x, y in DataLoader(ds, batch_size=4, collate_fn=pad):\n"
                       "    loss = F.cross_entropy(model(x), y)\n"
                       "    opt.zero_grad(); loss.backward(); opt.step()\n")
    fig = memory_figure(r.result)
    assert fig.axes[-1].get_xlabel() == "input elements drawn in the step"


EVAL = """
with torch.no_grad():
    for x, y in DataLoader(ds, batch_size=ebs, collate_fn=pad):
        correct = (crit(model(x), y) > 0).sum()
"""


EVAL_LOADER = """
with torch.no_grad():
    for x, y in loader:
        correct = (crit(model(x), y) > 0).sum()
"""


def test_eval_trials_are_forward_calls_and_fit_a_larger_batch(texts):
    run(texts, "crit = nn.CrossEntropyLoss()")
    ev = find(texts, "--loader loader --eval --steps 3", EVAL_LOADER)
    tr = find(texts, "--loader loader")
    assert ev.evaluation
    assert all(t.steps == 3 for t in ev.trials if not t.oom)
    assert ev.recommended_batch_size > tr.recommended_batch_size


def test_eval_leaves_the_model_and_optimizer_unchanged(texts):
    run(texts, "ebs = 8\ncrit = nn.CrossEntropyLoss()\nbefore = [p.clone() for p in model.parameters()]")
    find(texts, "--var ebs --eval", EVAL)
    assert all(torch.equal(a, b) for a, b in zip(texts.user_ns["before"], texts.user_ns["model"].parameters(),
                                                   strict=True))


def test_oom_in_an_evaluation_cell_points_to_find_batch_eval(texts):
    run(texts, "ebs = 400\ncrit = nn.CrossEntropyLoss()")
    with capture_output() as out:
        r = run(texts, "%%gpumem -d cpu --budget 1MiB\n" + EVAL)
    assert isinstance(r.error_in_exec, torch.OutOfMemoryError)
    text = "\n".join([out.stdout, *(str(v) for o in out.outputs for v in o.data.values())])
    assert "%%find_batch --eval --var ebs" in text
    assert "accumulation" not in text
    assert "Checkpoint activations" not in text


def test_measure_samples_large_data_sets_and_says_so():
    class Big(torch.utils.data.Dataset):
        def __len__(self):
            return 3 * MEASURE_ALL

        def __getitem__(self, i):
            return torch.zeros(1 + i % 1000)

    table = measure(torch.utils.data.DataLoader(Big(), batch_size=4))
    assert not isinstance(table, str)
    assert table.measured == 10_000
    assert "of a random 10,000" in table.measure


def test_sample_sizes_lists_every_sample_by_index():
    data = torch.utils.data.TensorDataset(torch.zeros(5, 3))
    assert sample_sizes(torch.utils.data.DataLoader(data)) == [3.0] * 5


def test_evaluation_steps_are_outermost_forwards_of_the_model_not_the_loss():
    from gpumagic.tracking import StopTrial, Tracker

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    crit = torch.nn.CrossEntropyLoss()
    calls = []

    def evaluate():
        with tracker, torch.no_grad():
            for _ in range(5):
                crit(model(torch.randn(3, 4)), torch.zeros(3, dtype=torch.long))
                calls.append(1)

    tracker = Tracker("cpu", stop_after_forwards=2)
    with pytest.raises(StopTrial):
        evaluate()
    assert len(calls) == 2
    assert tracker.report.total_steps == 2


def test_readme_size_fn_lambdas_work_as_written(texts):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    options = re.findall(r'`(--size-fn "lambda i: [^"`]+")`', readme)
    assert options, "the README's --size-fn lambda examples are gone"
    # the README's names: the raw sequences, and a length column, one per index
    run(texts, "texts = ds.items\nlengths = [len(t) for t in ds.items]")
    for option in options:
        res = find(texts, f"--loader loader {option}")
        assert res.sample_sizes is not None, option
        assert res.sample_sizes.measure == "the given size function"
        assert res.sample_sizes.largest == 128
        assert res.recommended_batch_size is not None


def test_a_short_final_batch_of_an_epoch_is_not_a_varying_input(ip, clean_ns):
    run(ip, """
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
data = TensorDataset(torch.randn(1000, 32), torch.randint(0, 4, (1000,)))
model = nn.Sequential(nn.Linear(32, 512), nn.ReLU(), nn.Linear(512, 4))
opt = torch.optim.SGD(model.parameters(), 0.1)
bs = 16
""")
    body = """
for x, y in DataLoader(data, batch_size=bs):   # 1000 samples: most sizes end with a short batch
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
"""
    with capture_output():
        r = run(ip, f"%%find_batch --var bs -d cpu --budget 6MiB -q -o\n{body}")
    assert r.error_in_exec is None, r.error_in_exec
    res = r.result
    assert any(t.batch_size > 334 and not t.oom for t in res.trials)  # 3 steps: the third batch is short
    assert res.variable_inputs is None
    assert not any("input sizes varied" in n for n in res.notes)


def test_headline_and_why_state_the_same_recommendation_when_inputs_vary(texts):
    from gpumagic.render.text import search_text

    # samples grow longer with their index and the loader does not shuffle: a trial's few steps see
    # the short ones only, so the size that survives the longest is below what the trials allowed
    run(texts, "ds = Texts(torch.arange(2000) // 20 + 4); bs = 8")
    body = "loader = DataLoader(ds, batch_size=bs, collate_fn=pad)\n" + TRAIN
    res = find(texts, "--var bs --steps 4", body)
    rec = res.recommended_batch_size
    assert res.variable_inputs is not None
    assert rec == res.variable_inputs.surviving_batch_size < res.variable_inputs.drawn_batch_size
    assert res.reason.startswith(f"{rec} is the largest"), res.reason
    why = re.search(r"^  why +(\d+)", search_text(res, width=200), re.MULTILINE)
    assert why is not None
    assert int(why.group(1)) == rec
