"""Out-of-memory errors in a real IPython shell: advice, a short traceback, %tb, memory given back."""

import pytest
import torch
from IPython.utils.capture import capture_output

from gpumagic.backends.cpu_exact import live_storages

MiB = 2**20
LOOP = """
loader = DataLoader(data, batch_size=batch_size)
for x, y in loader:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
"""


def run(ip, src):
    return ip.run_cell(src, store_history=True)


def live_cpu_bytes():
    return sum(st.nbytes() for st in live_storages("cpu").values())


def shown(cap):
    texts = [cap.stdout, cap.stderr]
    for o in cap.outputs:
        texts.extend(str(v) for v in o.data.values())
    return "\n".join(texts)


@pytest.fixture
def setup(ip, clean_ns):
    run(ip, """
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
data = TensorDataset(torch.randn(4096, 64), torch.randint(0, 10, (4096,)))
model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
opt = torch.optim.SGD(model.parameters(), 0.1)
batch_size = 4096
""")


def test_oom_in_gpumem_shows_advice_with_numbers_and_a_short_traceback(ip, setup):
    with capture_output() as cap:
        r = run(ip, "%%gpumem -d cpu --budget 6MiB\n" + LOOP)
    assert isinstance(r.error_in_exec, torch.OutOfMemoryError)
    out = shown(cap)
    assert "batch" in out.lower()
    assert "MiB" in out
    assert "(full traceback: %tb)" in out
    assert "_call_impl" not in out  # torch's internal frames are not in the short form


def test_tb_still_shows_the_full_traceback_afterwards(ip, setup):
    with capture_output():
        run(ip, "%%gpumem -d cpu --budget 6MiB\n" + LOOP)
    with capture_output() as cap:
        ip.run_line_magic("tb", "")
    out = shown(cap)
    assert "OutOfMemoryError" in out
    assert "forward" in out  # a frame inside torch.nn: the whole stack is there


def test_memory_after_the_failed_cell_is_back_within_5_percent_of_baseline(ip, setup):
    base = live_cpu_bytes()
    with capture_output():
        run(ip, "%%gpumem -d cpu --budget 8MiB\n"
                "held = []\n"
                "def grab():\n"
                "    for _ in range(64):\n"
                "        held.append(torch.empty(2**20, dtype=torch.uint8))\n"
                "grab()\n")
    ip.user_ns.pop("held", None)  # the cell's own global, as a user would `del held`
    assert live_cpu_bytes() <= base * 1.05


def test_tensors_held_by_the_failed_frames_are_freed(ip, setup):
    run(ip, """
import weakref
refs = []
def deep():
    xs = []
    for i in range(100):
        t = torch.empty(2**20, dtype=torch.uint8); refs.append(weakref.ref(t)); xs.append(t)
def outer():
    deep()
""")
    with capture_output():
        run(ip, "%%gpumem -d cpu --budget 16MiB\nouter()\n")
    assert ip.user_ns["refs"]
    assert all(r() is None for r in ip.user_ns["refs"])


def test_following_suggestion_one_literally_runs_without_oom(ip, setup):
    # the usual notebook story: it ran at a small batch, then a large one ran out of memory
    ip.user_ns["batch_size"] = 128
    with capture_output():
        assert run(ip, "%%gpumem -d cpu --budget 6MiB -q\n" + LOOP).error_in_exec is None
    ip.user_ns["batch_size"] = 4096
    with capture_output():
        r = run(ip, "%%gpumem -d cpu --budget 6MiB\n" + LOOP)
    first = r.error_in_exec.advice.suggestions[0]
    assert first.kind in ("batch_size", "measure")
    if first.kind == "measure":
        # the failed loop's kept batch and results are deleted first: a rerun computes them again
        assert first.code.splitlines()[-1] == "%find_batch --var batch_size -d cpu --budget 6MiB"
        with capture_output():
            assert run(ip, first.code).error_in_exec is None
        b = ip.magics_manager.registry["GPUMagics"].presenter.last_search.recommended_batch_size
    else:
        b = first.batch_size
    assert 128 < b < 4096
    ip.user_ns["batch_size"] = b
    with capture_output():
        r = run(ip, "%%gpumem -d cpu --budget 6MiB -q\n" + LOOP)
    assert r.error_in_exec is None, r.error_in_exec


def test_the_measuring_command_reruns_the_failed_cell_from_a_plain_find_batch(ip, setup):
    with capture_output():
        run(ip, "%%gpumem -d cpu --budget 6MiB\n" + LOOP)
        r = run(ip, "%find_batch --var batch_size -d cpu --budget 6MiB -o -q")
    assert r.error_in_exec is None
    assert r.result.recommended_batch_size is not None
    assert ip.user_ns["batch_size"] == 4096  # the search put the namespace back


def test_an_allocation_the_batch_does_not_drive_gets_advice_about_it_not_batch_advice(ip, clean_ns):
    ip.user_ns["bs"] = 16
    with capture_output():
        r = run(ip, "%%gpumem -d cpu --budget 2MiB\nbig = torch.randn(4096, 4096)\n")
    advice = r.error_in_exec.advice
    first = advice.suggestions[0]
    assert first.kind == "allocation"
    assert "64.00 MiB" in first.title
    assert "big = torch.randn(4096, 4096)" in first.detail
    assert all(s.kind not in ("batch_size", "measure", "accumulation") for s in advice.suggestions)
    assert "(now 16)" not in advice.text()


def test_memory_held_by_names_the_cell_does_not_use_ranks_first_and_is_named(ip, setup):
    run(ip, "old_cache = torch.empty(3 * 2**20, dtype=torch.uint8)")
    ip.user_ns["batch_size"] = 600  # fits 6 MiB without old_cache
    with capture_output():
        r = run(ip, "%%gpumem -d cpu --budget 6MiB\n" + LOOP)
    first = r.error_in_exec.advice.suggestions[0]
    assert first.kind == "holders"
    assert "old_cache" in first.detail


def test_memory_held_by_names_the_cell_uses_never_ranks_first(ip, setup):
    with capture_output():
        r = run(ip, "%%gpumem -d cpu --budget 6MiB\n" + LOOP)
    advice = r.error_in_exec.advice
    assert advice.suggestions[0].kind != "holders"
    assert "del data" not in advice.text()
    assert "del model" not in advice.text()


def test_a_batch_size_read_inside_a_function_from_an_earlier_cell_is_found(ip, setup):
    run(ip, "def get_batch():\n    i = torch.randint(0, 4096, (batch_size,))\n"
            "    return data.tensors[0][i], data.tensors[1][i]")
    with capture_output():
        r = run(ip, "%%gpumem -d cpu --budget 6MiB\nfor _ in range(2):\n    x, y = get_batch()\n"
                    "    loss = F.cross_entropy(model(x), y)\n    opt.zero_grad(); loss.backward(); opt.step()\n")
    first = r.error_in_exec.advice.suggestions[0]
    assert first.kind == "measure"
    assert first.code.splitlines()[-1] == "%find_batch --var batch_size -d cpu --budget 6MiB"


def test_oom_in_a_plain_cell_is_translated_by_the_global_handler(ip, setup):
    run(ip, "def build():\n    return [torch.empty(2**20, dtype=torch.uint8) for _ in range(10**6)]")
    with capture_output() as cap:
        r = run(ip, "raise RuntimeError('CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB total "
                    "capacity; 6.89 GiB already allocated; 5.06 MiB free; 7.05 GiB reserved in total by PyTorch)')")
    assert isinstance(r.error_in_exec, RuntimeError)
    out = shown(cap)
    assert "20.00 MiB" in out or "20 MiB" in out
    assert "(full traceback: %tb)" in out


def test_oom_translation_can_be_turned_off(ip, setup):
    ip.run_line_magic("gpumagic", "oom off")
    try:
        with capture_output() as cap:
            run(ip, "raise RuntimeError('CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB total "
                    "capacity; 6.89 GiB already allocated; 5.06 MiB free; 7.05 GiB reserved in total by PyTorch)')")
        assert "(full traceback: %tb)" not in shown(cap)
    finally:
        ip.run_line_magic("gpumagic", "oom on")


def test_non_oom_errors_look_exactly_as_usual(ip, setup):
    with capture_output() as cap:
        r = run(ip, "raise RuntimeError('shape mismatch: 3 vs 4')")
    assert isinstance(r.error_in_exec, RuntimeError)
    out = shown(cap)
    assert "shape mismatch" in out
    assert "full traceback: %tb" not in out


def test_oom_text_from_an_old_torch_inside_a_function_is_recognised(ip, setup):
    run(ip, "def train_step():\n"
            "    raise RuntimeError('CUDA error: out of memory\\nCUDA kernel errors might be asynchronously reported')")
    with capture_output() as cap:
        run(ip, "%%gpumem -d cpu -q\ntrain_step()\n")
    assert "(full traceback: %tb)" in shown(cap)



def test_advice_never_suggests_deleting_what_the_failing_cell_uses(ip, setup):
    run(ip, "old_cache = torch.empty(3 * 2**20, dtype=torch.uint8)")
    with capture_output() as cap:
        r = run(ip, "%%gpumem -d cpu --budget 8MiB\n" + LOOP)
    out = shown(cap)
    assert "old_cache" in out
    assert "del model" not in out
    for s in r.error_in_exec.advice.suggestions:
        # only the loop's own batch, which a rerun binds again before reading, may be deleted (before measuring)
        deleted = {n.strip() for line in (s.code or "").splitlines() if line.startswith("del ")
                   for n in line[4:].split("#")[0].split(",")}
        assert deleted <= ({"x", "y"} if s.kind == "measure" else {"old_cache"}), s


def test_a_list_of_batches_built_earlier_gets_batch_advice_with_its_leading_dimension(ip, setup):
    run(ip, "batches = list(zip(data.tensors[0].split(4096), data.tensors[1].split(4096)))")
    with capture_output():
        r = run(ip, "%%gpumem -d cpu --budget 6MiB\nfor x, y in batches:\n"
                    "    loss = F.cross_entropy(model(x), y)\n    opt.zero_grad(); loss.backward(); opt.step()\n")
    advice = r.error_in_exec.advice
    assert advice.suggestions[0].kind == "bound"  # only the failure's upper bound: never a size to use
    assert advice.suggestions[0].batch_size is None
    assert "(now 4096)" in advice.suggestions[0].title
