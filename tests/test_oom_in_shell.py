"""Out-of-memory errors in a real IPython shell: advice, a short traceback, %tb, memory given back."""

import pytest
import torch
from IPython.utils.capture import capture_output

from gpumagic.backends.cpu import live_storages

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


def test_following_the_suggested_batch_size_runs_without_oom(ip, setup):
    # the usual notebook story: it ran at a small batch, then a large one ran out of memory
    ip.user_ns["batch_size"] = 128
    with capture_output():
        assert run(ip, "%%gpumem -d cpu --budget 6MiB -q\n" + LOOP).error_in_exec is None
    ip.user_ns["batch_size"] = 4096
    with capture_output() as cap:
        run(ip, "%%gpumem -d cpu --budget 6MiB\n" + LOOP)
    import re

    m = re.search(r"Use batch size (\d+)", shown(cap))
    assert m, shown(cap)
    b = int(m.group(1))
    assert 128 < b < 4096
    ip.user_ns["batch_size"] = b
    with capture_output():
        r = run(ip, "%%gpumem -d cpu --budget 6MiB -q\n" + LOOP)
    assert r.error_in_exec is None, r.error_in_exec


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
        run(ip, "%%gpumem -d cpu --budget 8MiB\n" + LOOP)
    out = shown(cap)
    assert "old_cache" in out
    assert "del model" not in out
    assert "del x" not in out
