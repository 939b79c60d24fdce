"""Every kind of tensor is measured or skipped, never fatal; gpumagic's own failures never reach the cell.

Each test runs cells in the real IPython shell, as a notebook would.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from gpumagic import tracking

BETA = "ignore:Sparse CSR tensor support is in beta state:UserWarning"  # torch's own, not gpumagic's


def run(ip, src):
    return ip.run_cell(src, store_history=True)


@pytest.fixture(autouse=True)
def _forget_results(ip):
    """The searches and reports here are not the notebook story of later tests (OOM advice reads them)."""
    yield
    presenter = ip.magics_manager.registry["GPUMagics"].presenter
    presenter.last_search = presenter.last_report = None


def report_of(ip, cell: str):
    r = run(ip, "%%gpumem -o -q -d cpu\n" + cell)
    assert r.error_in_exec is None, r.error_in_exec
    return r.result


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


# --- sparse tensors are counted exactly -------------------------------------------------------------


def test_sparse_coo_tensor_made_in_the_cell_counts_its_indices_and_values(ip, clean_ns):
    run(ip, "dense = torch.randn(64, 64) * (torch.rand(64, 64) > 0.7)")
    rep = report_of(ip, "s = dense.to_sparse()\n")
    s = ip.user_ns["s"]
    assert rep.end_bytes - rep.baseline_bytes == nbytes(s._indices(), s._values())


@pytest.mark.filterwarnings(BETA)
@pytest.mark.parametrize(
    ("convert", "parts"),
    [
        ("to_sparse_csr()", ("crow_indices", "col_indices", "values")),
        ("to_sparse_csc()", ("ccol_indices", "row_indices", "values")),
        ("to_sparse_bsr((8, 8))", ("crow_indices", "col_indices", "values")),
        ("to_sparse_bsc((8, 8))", ("ccol_indices", "row_indices", "values")),
    ],
)
def test_compressed_sparse_tensor_counts_its_compressed_indices_plain_indices_and_values(ip, clean_ns, convert, parts):
    run(ip, "dense = torch.randn(64, 64) * (torch.rand(64, 64) > 0.7)")
    rep = report_of(ip, f"s = dense.{convert}\n")
    s = ip.user_ns["s"]
    assert rep.end_bytes - rep.baseline_bytes == nbytes(*(getattr(s, p)() for p in parts))


def test_coalesce_result_is_counted_as_new_memory(ip, clean_ns):
    run(ip, "i = torch.tensor([[0, 0, 1, 3], [2, 2, 0, 1]]); v = torch.ones(4)\n"
            "u = torch.sparse_coo_tensor(i, v, (4, 4), check_invariants=True)")
    rep = report_of(ip, "c = u.coalesce()\n")
    c = ip.user_ns["c"]
    assert rep.end_bytes - rep.baseline_bytes == nbytes(c._indices(), c._values())


def test_sparse_tensor_alive_before_the_cell_is_in_the_baseline(ip, clean_ns):
    run(ip, "big_sparse = (torch.randn(256, 256) * (torch.rand(256, 256) > 0.5)).to_sparse()")
    s = ip.user_ns["big_sparse"]
    rep = report_of(ip, "x = 1\n")
    assert rep.baseline_bytes >= nbytes(s._indices(), s._values())


def test_sparse_embedding_gradients_train_with_the_loops_own_losses(ip, clean_ns):
    run(ip, """
torch.manual_seed(0)
emb = nn.Embedding(1000, 16, sparse=True)
head = nn.Linear(16, 2)
opt = torch.optim.SGD([*emb.parameters(), *head.parameters()], lr=0.5)
ids = torch.randint(0, 1000, (8, 5)); labels = torch.randint(0, 2, (8,))
def train(n):
    out = []
    for _ in range(n):
        loss = F.cross_entropy(head(emb(ids).mean(1)), labels)
        opt.zero_grad(); loss.backward(); opt.step(); out.append(loss.item())
    return out
""")
    rep = report_of(ip, "truth = train(4)\n")
    assert list(rep.losses) == pytest.approx(ip.user_ns["truth"])
    assert rep.total_steps == 4
    assert rep.incomplete is None


# --- unreadable tensors are skipped and named ------------------------------------------------------


def test_mkldnn_tensors_are_skipped_and_named_in_the_notes(ip, clean_ns):
    rep = report_of(ip, "a = torch.randn(8, 8).to_mkldnn()\nb = torch.randn(4).to_mkldnn()\n")
    assert "not counted: 2 mkldnn tensors (their memory cannot be read on cpu)" in rep.notes
    assert rep.incomplete is None


WRAPPER = '''
class Boxed(torch.Tensor):
    """A wrapper subclass that does not say what it holds (no __tensor_flatten__)."""
    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)
    def __init__(self, inner):
        self.inner = inner
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unbox = lambda a: a.inner if isinstance(a, Boxed) else a
        out = func(*[unbox(a) for a in args], **{k: unbox(v) for k, v in (kwargs or {}).items()})
        return Boxed(out) if isinstance(out, torch.Tensor) else out
'''


def test_wrapper_subclass_that_hides_its_memory_is_skipped_and_named(ip, clean_ns):
    run(ip, WRAPPER)
    run(ip, "w = Boxed(torch.randn(16))")
    rep = report_of(ip, "w2 = w * 2\n")
    assert "not counted: 1 Boxed tensor (their memory cannot be read on cpu)" in rep.notes  # w2; w is older
    assert rep.incomplete is None


# --- gpumagic's own failures degrade the report, never the cell ---------------------------------------


def test_a_failing_step_hook_marks_the_report_incomplete_and_the_loop_runs_on(ip, clean_ns, monkeypatch):
    def broken(self, optimizer):
        raise KeyError("internal")

    monkeypatch.setattr(tracking.Tracker, "_end_step", broken)
    run(ip, "m = nn.Linear(4, 1); o = torch.optim.SGD(m.parameters(), 0.1); x = torch.randn(8, 4)")
    rep = report_of(ip, "for _ in range(3):\n    o.zero_grad(); m(x).sum().backward(); o.step()\ndone = True\n")
    assert ip.user_ns["done"] is True
    assert rep.incomplete == "the optimizer step hook failed: KeyError: 'internal'"
    assert "incomplete" in rep.to_text()


def test_a_failing_cpu_tracker_marks_the_report_incomplete_and_the_op_still_runs(ip, clean_ns, monkeypatch):
    from gpumagic.backends import cpu_exact

    def broken(self, t):
        raise IndexError("tracker")

    monkeypatch.setattr(cpu_exact.CPUSession, "_add_other", broken)
    run(ip, "dense = torch.eye(4)")
    rep = report_of(ip, "s = dense.to_sparse()\ntotal = float(s.to_dense().sum())\n")
    assert ip.user_ns["total"] == 4.0
    assert rep.incomplete is not None
    assert rep.incomplete.startswith("the cpu tracker failed after ")
    assert rep.incomplete.endswith("IndexError: tracker")


def test_a_failing_report_keeps_the_users_exception_and_gives_a_partial_report(ip, clean_ns, monkeypatch):
    def broken(self, error):
        raise ZeroDivisionError("ours")

    monkeypatch.setattr(tracking.Tracker, "_finish", broken)
    run(ip, "class Theirs(Exception): pass")
    r = run(ip, "%%gpumem -q -d cpu\nraise Theirs('the user\\'s')\n")
    assert type(r.error_in_exec).__name__ == "Theirs"
    assert str(r.error_in_exec) == "the user's"


def test_a_failing_renderer_still_shows_the_text_and_html_report(ip, clean_ns, monkeypatch):
    from IPython.utils.capture import capture_output

    from gpumagic.render import widgets

    def broken(obj, kind):
        raise RuntimeError("renderer")

    monkeypatch.setattr(widgets, "rich_bundle", broken)
    with capture_output() as cap:
        r = run(ip, "%%gpumem -d cpu\nx = torch.ones(3)\n")
    assert r.error_in_exec is None
    assert any("gpumagic memory report" in o.data.get("text/html", "") for o in cap.outputs)
    assert "Traceback" not in cap.stdout + cap.stderr


# --- odd namespaces -------------------------------------------------------------------------------


def test_a_meta_model_in_the_namespace_does_not_decide_the_device(ip, clean_ns):
    run(ip, "with torch.device('meta'):\n    big = nn.Linear(4096, 4096)\nsmall = nn.Linear(4, 4)")
    r = run(ip, "%%gpumem -o -q\ny = small(torch.ones(2, 4))\n")
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result.device == "cpu"


def test_a_meta_model_in_the_namespace_does_not_stop_find_batch(ip, clean_ns):
    run(ip, "with torch.device('meta'):\n    big = nn.Linear(4096, 4096)\n"
            "m = nn.Linear(4, 2); o = torch.optim.SGD(m.parameters(), 0.1); X = torch.randn(64, 4); bs = 2")
    r = run(ip, "%%find_batch -q -o --var bs --budget 64MiB --max 16\n"
                "for _ in range(3):\n    o.zero_grad(); m(X[:bs]).sum().backward(); o.step()\n")
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result.device == "cpu"


def test_a_fake_tensor_alive_in_the_process_makes_no_warning_and_no_device(ip, clean_ns):
    run(ip, "from torch._subclasses.fake_tensor import FakeTensorMode\n"
            "with FakeTensorMode():\n    fake = torch.empty(1024)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # as a notebook shows them (pytest would make them errors)
        r = run(ip, "%%gpumem -o -q\nx = torch.ones(10)\n")
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result.device == "cpu"
    assert [str(w.message) for w in caught] == []


def test_exception_whose_str_raises_reaches_the_user_unchanged(ip, clean_ns):
    run(ip, "class Odd(RuntimeError):\n    def __str__(self):\n        raise ValueError('no text')\n"
            "odd = Odd()")
    # without history: IPython's own history record calls str() on the error (and fails the same way)
    r = ip.run_cell("%%gpumem -q -d cpu\nraise odd\n")
    assert r.error_in_exec is ip.user_ns["odd"]


def test_exception_whose_str_raises_in_a_trial_reaches_the_user_unchanged(ip, clean_ns):
    run(ip, "class Odd(RuntimeError):\n    def __str__(self):\n        raise ValueError('no text')\n"
            "odd = Odd(); bs = 2")
    r = ip.run_cell("%%find_batch -q --var bs -d cpu --budget 64MiB\nx = torch.ones(bs)\nraise odd\n")
    assert r.error_in_exec is ip.user_ns["odd"]
