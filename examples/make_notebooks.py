"""Write the example notebooks from the cell sources below, without outputs.

    python examples/make_notebooks.py          # rewrites examples/0*.ipynb

The notebooks are committed without outputs (a test checks that); CI executes them with nbclient
(tests/test_examples.py). Edit the sources here, run this script, and commit both.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
COLAB_URL = "https://colab.research.google.com/github/gpumagic/gpumagic/blob/main/examples/05_colab_gpu.ipynb"

MD, CODE = "md", "code"
RAISES = "raises-exception"  # nbclient lets a cell with this tag fail; the tests check its advice


def notebook(cells: list[tuple], *, colab: bool = False) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    if colab:
        nb.metadata["accelerator"] = "GPU"
        nb.metadata["colab"] = {"provenance": [], "gpuType": "T4"}
    for i, (kind, source, *tags) in enumerate(cells):
        source = source.strip("\n")
        if kind == MD:
            cell = new_markdown_cell(source)
        else:
            cell = new_code_cell(source)
            if tags:
                cell.metadata["tags"] = list(tags)
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating changes only what was edited
        nb.cells.append(cell)
    nbformat.validator.normalize(nb)
    return nb


# -------------------------------------------------------------------------------------------------
# 01 quickstart

MLP_SETUP = """
import torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
import gpumagic
from gpumagic import format_bytes

torch.manual_seed(0)
X = torch.randn(8192, 128)
labels = (X @ torch.randn(128, 10)).argmax(1)     # a learnable 10-class problem
data = TensorDataset(X, labels)
model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
batch_size = 64
"""

EPOCH = """
loader = DataLoader(data, batch_size=batch_size, shuffle=True)
for x, y in loader:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
"""

QUICKSTART = [
    (MD, """
# gpumagic in five minutes

A small classifier trained on the CPU, so this runs anywhere. `-d cpu --budget 24MiB` makes the
CPU behave like a 24 MiB accelerator: gpumagic counts every tensor byte exactly and an allocation
past the budget raises the same `torch.OutOfMemoryError` a GPU would. On a real GPU, drop both
options.

What to look at:

1. **`%%gpumem`** on an unchanged training cell: peak memory of the cell and of every step, what
   the memory was spent on, per-step time and loss.
2. **`%find_batch`**: the largest batch that fits, found in a few short trials, with the model
   and optimizer left exactly as they were.
3. **The widget**: move the slider to see the predicted peak for any batch size.
"""),
    (CODE, "%load_ext gpumagic"),
    (CODE, MLP_SETUP),
    (MD, """
## 1. Measure a training cell

`%%gpumem` on top of the cell, nothing else changes. Read the report from the top:

- **baseline**: tensors that existed before the cell (the data, the model). They count against
  the budget but are not what training adds.
- **peak**: the highest point, absolute and over the baseline. This is the number that has to fit.
- **at the peak**: parameters, gradients, optimizer state (Adam keeps two tensors per parameter),
  and activations, the only part that grows with the batch size.
- **steps**: one per `opt.step()`, with the median time per step, the range of per-step peaks and
  the loss.
"""),
    (CODE, "%%gpumem -d cpu --budget 24MiB" + EPOCH),
    (MD, """
## 2. Find the batch size that fits

Without a statement, `%find_batch` re-runs the last `%%gpumem` cell with `batch_size` set to each
trial size, stops every trial after 3 optimizer steps, and fits peak memory against batch size.
The pick keeps 5% of the budget free (`--margin`). Afterwards the weights, the Adam state, the
random generators and `batch_size` are what they were before.

In JupyterLab, Notebook 7 and VS Code the result is a widget: the slider picks a batch size, the
readout shows the predicted peak, the plot shows the trials, the fitted line and the budget.
Where widgets do not render (GitHub's viewer, static HTML) the same plot is shown as a picture.
"""),
    (CODE, "res = %find_batch --var batch_size -d cpu --budget 24MiB -o"),
    (CODE, """
print(f"{len(res.trials)} trials, {res.oom_count} out of memory; largest batch that ran: {res.max_batch_size}")
if res.fit is not None:
    print(f"peak ≈ {format_bytes(round(res.fit.intercept_bytes))} "
          f"+ {format_bytes(round(res.fit.bytes_per_sample))} per sample")
print(f"recommended batch size: {res.recommended_batch_size}, "
      f"predicted peak {format_bytes(res.predicted_peak_bytes)} of the 24 MiB budget")
print(f"batch_size is still {batch_size}")
"""),
    (MD, """
## 3. Train with the recommendation

`-o -q` returns the report instead of displaying it twice, so the next cell can compare the
measured peak with the search's prediction.
"""),
    (CODE, "batch_size = res.recommended_batch_size"),
    (CODE, "%%gpumem -d cpu --budget 24MiB -o -q" + EPOCH),
    (CODE, """
rep = _
print(f"measured peak {format_bytes(rep.peak_bytes)}, predicted {format_bytes(res.predicted_peak_bytes)}, "
      f"budget {format_bytes(rep.budget_bytes)}: {100 * rep.peak_bytes / rep.budget_bytes:.0f}% used")
print(f"{rep.total_steps} steps instead of {len(data) // 64} at batch 64")
"""),
]

# -------------------------------------------------------------------------------------------------
# 02 OOM advice

OOM = [
    (MD, """
# Out of memory: read the advice, follow it, get the memory back

The usual cure for `CUDA out of memory` is halving the batch size until the error stops, then
restarting the kernel because the memory never came back. gpumagic reads the figures in the error,
combines them with what it measured, and says which batch fits, how many accumulation steps keep
the effective batch, and what to do with the learning rate. It also frees what the failed cell
was holding.

This notebook makes the CPU a 24 MiB device (`--budget 24MiB`) and asks for a batch of 4096,
which does not fit.
"""),
    (CODE, "%load_ext gpumagic"),
    (CODE, MLP_SETUP.replace("batch_size = 64", "batch_size = 4096")),
    (CODE, """
before = gpumagic.device_status("cpu")
print(f"tensor memory before training: {format_bytes(before.allocated_bytes)}")
"""),
    (MD, """
## The cell that fails

The error below is shortened to one line and the place in your code (`%tb` shows the full
traceback). Above it is the advice: the headline repeats the figures of the error, and the line
under it says which of the cell's names gpumagic released. The first suggestion is what to do
next, and it works when done literally: here the error's figures only bound the batch size (the
step failed part-way, so it needed more than they show), so the first suggestion is the command
that measures it for this cell, on this device and budget. The accumulation suggestion keeps the
effective batch of 4096; "Unknown" lists what could not be derived.
"""),
    (CODE, "%%gpumem -d cpu --budget 24MiB" + EPOCH, RAISES),
    (MD, """
## The memory came back, and nothing was lost

After an OOM, the traceback's frames keep the failed step's activations alive, which is why
`torch.cuda.empty_cache()` alone often frees nothing; and a name the failed cell bound to a tensor
with an autograd graph (`loss`, after a failure in `backward()`) keeps the whole graph.
gpumagic clears those frames (the traceback itself stays usable) and frees the graphs: such a
tensor keeps its value, detached. It never deletes a value: `x` and `y`, the batch the failed
loop drew, are still there, and `%gpumem --free` says they hold memory, next to the data `X` and
the model, which the cell only used. The advice's measuring command deletes the batch first,
since running the cell again draws a new one; here we delete it by hand.
"""),
    (CODE, "%gpumem -d cpu --free"),
    (CODE, """
print("x" in globals(), "y" in globals())   # kept: gpumagic never deletes a value
del x, y   # the failed loop's batch: running the cell again draws a new one
after = gpumagic.device_status("cpu")
print(f"tensor memory before the failing cell {format_bytes(before.allocated_bytes)}, "
      f"now {format_bytes(after.allocated_bytes)}: "
      f"difference {after.allocated_bytes - before.allocated_bytes} bytes")
"""),
    (MD, """
## The advice as an object

The same advice is there from Python: `gpumagic.oom.last_advice()` is the advice last shown (the
exception carries it too, as `sys.last_value.advice`), and `gpumagic.parse_oom` reads every figure
in the error.
"""),
    (CODE, """
import sys

info = gpumagic.parse_oom(sys.last_value)
advice = gpumagic.oom.last_advice()
print(f"from the error: tried to allocate {format_bytes(info.tried_to_allocate)}, "
      f"{format_bytes(info.free)} free of {format_bytes(info.total_capacity)}")
first = advice.suggestions[0]
print(f"suggestion 1 ({first.kind}): {first.title}")
print(first.code)
"""),
    (MD, """
## Follow the advice

Suggestion 1 is a command: run it as it is (here with `-o` to keep the result). `%find_batch`
without code re-runs the cell that failed at a few batch sizes, fits memory against batch size,
and tries the largest size that fits before recommending it. Its out-of-memory trials are part of
the search, not errors.
"""),
    (CODE, "res = %find_batch --var batch_size -d cpu --budget 24MiB -o"),
    (CODE, """
print(f"measured: batch size {res.recommended_batch_size} fits (largest that ran {res.max_batch_size}, "
      f"{len(res.trials)} trials)")
batch_size = res.recommended_batch_size
"""),
    (CODE, "%%gpumem -d cpu --budget 24MiB" + EPOCH),
    (MD, """
The same cell now runs to the end, with the peak a few percent under the budget. To keep the
effective batch of 4096 instead, ask for it: `%find_batch --var batch_size --effective 4096`
returns the micro-batch, the number of accumulation steps and the learning-rate rule (see
`03_effective_batch.ipynb`).
"""),
]

# -------------------------------------------------------------------------------------------------
# 03 effective batch

EFFECTIVE_SETUP = """
import math, statistics
import torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
import gpumagic
from gpumagic import format_bytes

torch.manual_seed(0)
teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
with torch.no_grad():
    X = torch.randn(6144, 32)
    y = teacher(X).argmax(1)
    noisy = torch.rand(len(y)) < 0.1                   # 10% wrong labels: something to overfit
    y[noisy] = torch.randint(0, 10, (int(noisy.sum()),))
train_data = TensorDataset(X[:4096], y[:4096])
X_val, y_val = X[4096:], y[4096:]
del teacher


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def train(model, opt, loader, accumulation=1):
    \"\"\"One epoch; with accumulation=k, one optimizer step every k micro-batches.\"\"\"
    for i, (x, y) in enumerate(loader):
        loss = F.cross_entropy(model(x), y) / accumulation
        loss.backward()
        if (i + 1) % accumulation == 0:
            opt.step()
            opt.zero_grad()


def train_epoch(model, opt, batch_size, accumulation=1):
    train(model, opt, DataLoader(train_data, batch_size=batch_size, shuffle=True), accumulation)


@torch.no_grad()
def val_accuracy(model):
    return (model(X_val).argmax(1) == y_val).float().mean().item()


model = make_model()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
batch_size = 64
"""

EFFECTIVE = [
    (MD, """
# Batch size trade-offs, measured

Everyone knows the rules of thumb: bigger batches are faster per epoch but need more memory, small
batches generalise better, use powers of two, reach a large batch with gradient accumulation and
scale the learning rate, use the full batch when the data set is small. This notebook puts numbers
from gpumagic's measurements next to each of them, on a small MLP and a 4096-sample data set with
10% noisy labels, on the CPU with a simulated 16 MiB device. The whole notebook runs in well under
a minute.

Your numbers on a GPU will differ (per-step overhead is smaller relative to the work, and kernels
tile), but the way to read them does not.
"""),
    (CODE, "%load_ext gpumagic"),
    (CODE, EFFECTIVE_SETUP),
    (MD, """
## 1. Speed against memory

Each trial of a search runs 3 optimizer steps and measures the peak and, from the second step on,
samples per second. `--pick throughput` recommends the smallest batch within 5% of the best
throughput seen instead of the largest that fits.
"""),
    (CODE, "res = %find_batch --var batch_size -d cpu --budget 16MiB --pick throughput -o -- train_epoch(model, opt, batch_size)"),
    (CODE, """
print(f"{'batch':>6} {'peak':>11} {'samples/s':>10}")
for t in sorted(res.trials, key=lambda t: t.batch_size):
    sps = "OOM" if t.oom else f"{t.samples_per_second:,.0f}" if t.samples_per_second else "-"
    print(f"{t.batch_size:>6} {format_bytes(t.peak_bytes):>11} {sps:>10}")
print(f"\\n--pick throughput recommends {res.recommended_batch_size}; the largest that ran is {res.max_batch_size}")
"""),
    (MD, """
Memory grows linearly with the batch (the fitted line in the plot). Samples per second climb
steeply at small sizes, where every step pays a fixed overhead (Python, the optimizer, kernel
launches on a GPU), then more and more slowly. Where they stop climbing before memory runs out,
`--pick throughput` recommends the smaller batch: the extra memory would buy no speed. The
result's text says which case this is.

## 2. Powers of two

`--pick pow2` recommends the largest power of two that fits. Whether powers of two are faster is
a property of the device and the kernels (tensor cores want multiples of 8 in fp16), not a law:
measure it. Here: samples per second from the median step time of 20 steps (best of three
interleaved rounds), at sizes just below, at, and just above a power of two.
"""),
    (CODE, "res_pow2 = %find_batch --var batch_size -d cpu --budget 16MiB --pick pow2 -o -q -- train_epoch(model, opt, batch_size)"),
    (CODE, """
def samples_per_second(b, steps=20):
    m = make_model()
    o = torch.optim.Adam(m.parameters(), lr=1e-3)
    xb, yb = X[:b], y[:b]
    with gpumagic.track(device="cpu") as t:
        for _ in range(steps):
            loss = F.cross_entropy(m(xb), yb)
            o.zero_grad()
            loss.backward()
            o.step()
    median = statistics.median(s.seconds for s in t.report.steps[2:])   # Adam state exists from step 2
    return b / median


print(f"--pick pow2 recommends {res_pow2.recommended_batch_size}\\n")
sizes = (120, 128, 136, 248, 256, 264)
rates = dict.fromkeys(sizes, 0.0)
for _ in range(3):                         # interleaved rounds, best of three: robust to a busy machine
    for b in sizes:
        rates[b] = max(rates[b], samples_per_second(b))
for b in sizes:
    print(f"batch {b:>4}: {rates[b]:>8,.0f} samples/s")
print()
for b in (128, 256):
    print(f"batch {b} runs at {rates[b] / ((rates[b - 8] + rates[b + 8]) / 2):.2f}× the mean throughput of {b - 8} and {b + 8}")
"""),
    (MD, """
A ratio near 1 means the power of two is not special on this device: on the CPU, throughput
simply follows the batch size. Run the same cell on your GPU before rounding a batch down to a
power of two and giving up memory for it.

## 3. Epochs, iterations and generalisation

One epoch is `ceil(4096 / batch)` iterations. Larger batches make fewer, more expensive steps:
epochs get faster until throughput saturates, but the model is updated fewer times. Below, three
runs of 3 epochs each from the same initial weights: batch 32, batch 512 with the same learning
rate, and batch 512 with the learning rate scaled by √(512/32) = 4 (the square-root rule for Adam;
SGD uses the linear rule). Steps, times and peaks come from gpumagic's reports; the loss is the
mean over the last epoch; accuracy is on the 2048 held-out samples.
"""),
    (CODE, """
def run(b, lr, epochs=3):
    m = make_model()
    o = torch.optim.Adam(m.parameters(), lr=lr)
    with gpumagic.track(device="cpu") as t:
        for _ in range(epochs):
            train_epoch(m, o, b)
    rep = t.report
    return {
        "batch": b, "lr": lr, "steps": rep.total_steps,
        "ms_step": 1e3 * statistics.median(s.seconds / s.count for s in rep.steps),
        "s_epoch": rep.wall_seconds / epochs, "peak": rep.peak_bytes,
        "loss": statistics.mean(rep.losses[-(rep.total_steps // epochs):]), "val_acc": val_accuracy(m),
    }


r32, r512, r512_lr = run(32, 1e-3), run(512, 1e-3), run(512, 1e-3 * math.sqrt(512 / 32))
print(f"{'batch':>5} {'lr':>7} {'steps':>6} {'ms/step':>8} {'s/epoch':>8} {'peak':>10} {'loss':>6} {'val acc':>8}")
for r in (r32, r512, r512_lr):
    print(f"{r['batch']:>5} {r['lr']:>7.4f} {r['steps']:>6} {r['ms_step']:>8.2f} {r['s_epoch']:>8.2f} "
          f"{format_bytes(r['peak']):>10} {r['loss']:>6.3f} {r['val_acc']:>8.3f}")
print(f"\\nbatch 512 makes {r32['steps'] // r512['steps']}× fewer steps, each {r512['ms_step'] / r32['ms_step']:.1f}× "
      f"as long as a step at 32: an epoch takes {r512['s_epoch'] / r32['s_epoch']:.2f}× the time")
print(f"peak memory: {format_bytes(r32['peak'])} at 32, {format_bytes(r512['peak'])} at 512")
print(f"validation accuracy: {r32['val_acc']:.3f} at 32; at 512 {r512['val_acc']:.3f} with the same "
      f"learning rate, {r512_lr['val_acc']:.3f} with the scaled one")
"""),
    (MD, """
Read the columns together. With the learning rate unchanged, the large batch made 16 times fewer
updates in the same three epochs, and it shows in the loss and in held-out accuracy: that is most
of what "small batches generalise better" means in practice. Scaling the learning rate with the
batch closes much of the gap. Compare runs at equal *epochs* for wall-clock cost, and at equal
*steps* for optimisation progress (and rescale step-based schedules when the batch changes).

## 4. Gradient accumulation to reach an effective batch

Say the recipe calls for an effective batch of 2048, which does not fit in 16 MiB.
`--effective 2048` searches the micro-batch that fits and returns the accumulation steps that
reach 2048 and what to do with the learning rate. The fit predicts what one batch of 2048 would
need.
"""),
    (CODE, "res_eff = %find_batch --var batch_size -d cpu --budget 16MiB --effective 2048 -o -- train_epoch(model, opt, batch_size)"),
    (CODE, """
micro, accumulation = res_eff.recommended_batch_size, res_eff.accumulation_steps
print(f"micro-batch {micro} × {accumulation} accumulation steps = {micro * accumulation}")
print(f"learning rate: {res_eff.lr_note}")
print(f"one batch of 2048 would need about {format_bytes(res_eff.predicted_peak(2048))} of the 16 MiB")
"""),
    (MD, """
Train with it. The report counts optimizer steps (4096 / 2048 = 2 per epoch), and each step's
peak is that of one micro-batch, not of 2048 samples. The loss is the mean over the micro-batches
(gpumagic undoes the `/ accumulation`).
"""),
    (CODE, """
%%gpumem -d cpu --budget 16MiB
train_epoch(model, opt, micro, accumulation=accumulation)
"""),
    (MD, """
## 5. Full batch for a small data set

With 256 samples the whole data set fits in one batch many times over. `%find_batch` notices that
memory stops growing at the data-set size and says so instead of reporting a memory limit.
"""),
    (CODE, """
small_ds = TensorDataset(X[:256], y[:256])
small_loader = DataLoader(small_ds, batch_size=16, shuffle=True)
"""),
    (CODE, "res_small = %find_batch --loader small_loader -d cpu --budget 16MiB -o -- train(model, opt, small_loader)"),
    (CODE, 'print(f"recommended batch size {res_small.recommended_batch_size} for a data set of {len(small_ds)} samples")'),
    (MD, """
At full batch an epoch is one deterministic step, and full-batch methods become usable. L-BFGS
evaluates its closure (forward and backward) up to 20 times per `step`; gpumagic counts each
`step` once and records the closure's loss. Its memory is the history of the last
`history_size` updates (two parameter-sized vectors each), shown as optimizer state.
"""),
    (CODE, """
m = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))   # a small model for a small data set
lbfgs = torch.optim.LBFGS(m.parameters(), lr=1, max_iter=20, history_size=10)
xs, ys = small_ds.tensors


def closure():
    lbfgs.zero_grad()
    loss = F.cross_entropy(m(xs), ys)
    loss.backward()
    return loss
"""),
    (CODE, """
%%gpumem -d cpu --budget 16MiB
for _ in range(5):
    lbfgs.step(closure)
"""),
    (CODE, """
with torch.no_grad():
    final_loss = F.cross_entropy(m(xs), ys).item()
print(f"full-batch L-BFGS: training loss {final_loss:.2g} on 256 samples, validation accuracy {val_accuracy(m):.3f}")
"""),
    (MD, """
The training loss goes to almost zero: 256 samples, 10% of them with wrong labels, memorised. With
a small data set, full batch makes optimisation easy; what it cannot give is more data, and the
validation accuracy says so.
"""),
]

# -------------------------------------------------------------------------------------------------
# 04 loader built earlier, loop in a function, AMP

LOADER_SETUP = """
import torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
import gpumagic
from gpumagic import format_bytes

torch.manual_seed(0)
X = torch.randn(8192, 128)
labels = (X @ torch.randn(128, 10)).argmax(1)
train_ds = TensorDataset(X, labels)
train_loader = DataLoader(train_ds, batch_size=32, shuffle=True, drop_last=True)
"""

LOADER_MODEL = """
model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
scaler = torch.amp.GradScaler("cpu")


def train(model, loader, amp=True):
    \"\"\"One epoch with bfloat16 autocast and a GradScaler, the usual mixed-precision loop.\"\"\"
    model.train()
    for x, y in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
"""

LOADER = [
    (MD, """
# The DataLoader was built in an earlier cell

The common notebook layout: data and `train_loader` in one cell, the model and a `train()`
function in another, and a one-line cell that trains. There is no `batch_size` variable that the
training cell reads, so `%find_batch --var batch_size` would change nothing (gpumagic notices: the
batches keep their old size, and it says to use `--loader`).

`--loader train_loader` rebinds `train_loader` for each trial to a copy with the trial's batch size
(same data set, sampler, `collate_fn`, workers, `pin_memory`, `drop_last`) and puts the original
back afterwards. The loop runs under bfloat16 autocast with a `GradScaler`, as on a GPU.
"""),
    (CODE, "%load_ext gpumagic"),
    (CODE, LOADER_SETUP),
    (CODE, LOADER_MODEL),
    (MD, """
## Measure the function call

`%%gpumem` works the same when the loop is inside a function: steps are `opt.step()` calls,
wherever they happen. The loss it records is the unscaled one (the `GradScaler` multiplies it by
65536 before `backward`).
"""),
    (CODE, """
%%gpumem -d cpu --budget 16MiB
train(model, train_loader)
"""),
    (MD, """
## Mixed precision, measured

Autocast keeps bfloat16 copies of the weights and saves bfloat16 activations for the backward
pass. Five steps each way, from the Python API (`gpumagic.track`, the engine behind `%%gpumem`):
"""),
    (CODE, """
from itertools import islice

for amp in (False, True):
    with gpumagic.track(device="cpu") as t:
        train(model, list(islice(DataLoader(train_ds, batch_size=1024), 5)), amp=amp)
    print(f"{'bfloat16 autocast' if amp else 'float32':>17}: peak {format_bytes(t.report.peak_delta_bytes)} "
          f"over the baseline at batch 1024, {1e3 * t.report.wall_seconds / 5:.1f} ms per step")
"""),
    (MD, """
## Find the batch size for the loader

The statement after `--` is what each trial runs. Model, optimizer, scaler (its scale and growth
tracker), RNG and `train_loader` are restored afterwards: the checks below compare them with
before.
"""),
    (CODE, """
weights_before = [p.detach().clone() for p in model.parameters()]
scale_before = scaler.get_scale()
"""),
    (CODE, "res = %find_batch --loader train_loader -d cpu --budget 16MiB -o -- train(model, train_loader)"),
    (CODE, """
print(f"recommended batch size {res.recommended_batch_size}, predicted peak {format_bytes(res.predicted_peak_bytes)}")
print(f"train_loader.batch_size is still {train_loader.batch_size}")
print("weights unchanged:", all(torch.equal(a, b) for a, b in zip(weights_before, model.parameters())))
print("GradScaler scale unchanged:", scaler.get_scale() == scale_before)
"""),
    (MD, """
## Use it

Rebuild the loader with the recommendation (the search does not rebind it for you) and train.
"""),
    (CODE, "train_loader = DataLoader(train_ds, batch_size=res.recommended_batch_size, shuffle=True, drop_last=True)"),
    (CODE, """
%%gpumem -d cpu --budget 16MiB
train(model, train_loader)
"""),
]

# -------------------------------------------------------------------------------------------------
# 05 Colab / GPU

COLAB_SETUP = """
import torch, torch.nn as nn, torch.nn.functional as F
import gpumagic
from gpumagic import format_bytes

device = "cuda" if torch.cuda.is_available() else "cpu"
print(f"device: {device}" + ("" if device == "cuda" else " (no GPU: the GPU-only cells below print 'no GPU: skipped')"))

torch.manual_seed(0)
model = nn.Sequential(                      # a small CNN on 64×64 images: activations dominate
    nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
    nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
    nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
).to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
batch_size = 16


def train_steps(model, batch_size, steps=20):
    \"\"\"Steps on random images; on a GPU the batch is made on the device, as a data pipeline would.\"\"\"
    for _ in range(steps):
        x = torch.randn(batch_size, 3, 64, 64, device=device)
        y = torch.randint(0, 10, (batch_size,), device=device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
"""

COLAB = [
    (MD, f"""
# gpumagic on a GPU (Colab)

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({COLAB_URL})

In Colab choose *Runtime → Change runtime type → T4 GPU*, then *Run all*. Without a GPU the
notebook still runs: the device becomes the CPU with a simulated budget, and cells that only make
sense on a GPU print `no GPU: skipped`.

On a GPU gpumagic reads PyTorch's caching-allocator counters (no device synchronisation per step)
and NVML for the device total and the other processes using it. Colab renders the widgets
without any extra set-up.
"""),
    (CODE, """
import sys

if "google.colab" in sys.modules:      # elsewhere gpumagic is already installed: do nothing
    %pip install --quiet gpumagic
"""),
    (CODE, "%load_ext gpumagic"),
    (CODE, COLAB_SETUP),
    (MD, """
## The device now

`%gpumem` without a cell: allocated by tensors, reserved by PyTorch's cache, total and free, and
(on a GPU, through NVML) every process using the device, with its memory.
"""),
    (CODE, "%gpumem"),
    (MD, """
## A training cell

`%%gpumem` measures on the device the model lives on. On a GPU, "peak reserved" is what the
caching allocator held: the figure `nvidia-smi` shows, usually somewhat above the peak allocated.
"""),
    (CODE, """
%%gpumem
train_steps(model, batch_size)
"""),
    (MD, """
## The largest batch that fits

On a GPU the capacity is the device's memory; on the CPU fallback it is a 128 MiB budget.
"""),
    (CODE, """
if torch.cuda.is_available():
    res = %find_batch --var batch_size -o -- train_steps(model, batch_size)
else:
    res = %find_batch --var batch_size -d cpu --budget 128MiB -o -- train_steps(model, batch_size)
"""),
    (CODE, """
print(f"recommended batch size {res.recommended_batch_size} on {res.device}, "
      f"predicted peak {format_bytes(res.predicted_peak_bytes)} of {format_bytes(res.capacity_bytes)}")
"""),
    (MD, """
## GPU only: a smaller GPU, simulated

`--budget` on CUDA sets PyTorch's per-process memory fraction for the cell and restores it after,
so a 16 GB card can rehearse a run meant for an 8 GB one.
"""),
    (CODE, """
if not torch.cuda.is_available():
    print("no GPU: skipped")
else:
    res_small = %find_batch --var batch_size --budget 2GiB -o -q -- train_steps(model, batch_size)
    print(f"with 2 GiB: batch {res_small.recommended_batch_size}; "
          f"with the whole device: batch {res.recommended_batch_size}")
"""),
    (MD, """
## GPU only: a real out-of-memory error

Four times the largest batch that ran. gpumagic translates the error in any cell (not only under
`%%gpumem`), frees what the failed step held and shows the allocator's counters back where they
were.
"""),
    (CODE, """
if not torch.cuda.is_available():
    print("no GPU: skipped")
else:
    allocated_before = torch.cuda.memory_allocated()
    train_steps(model, 4 * res.max_batch_size, steps=1)
""", RAISES),
    (CODE, """
if not torch.cuda.is_available():
    print("no GPU: skipped")
else:
    print(f"allocated before the failing cell {format_bytes(allocated_before)}, "
          f"now {format_bytes(torch.cuda.memory_allocated())}")
    %gpumem
"""),
]


# -------------------------------------------------------------------------------------------------
# 06 plan for a GPU

PLAN_SETUP = """
import torch, torch.nn as nn, torch.nn.functional as F
import gpumagic
from gpumagic import format_bytes

VOCAB, CONTEXT = 50304, 512


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    \"\"\"A GPT-2-style decoder: token and position embeddings, pre-norm blocks, tied output layer.\"\"\"

    def __init__(self, n_layer=12, d_model=768, heads=12):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, d_model), nn.Embedding(CONTEXT, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(n_layer))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


def train(batch_size, dtype, steps=3):
    \"\"\"The cell below as a function, for the line form of find_batch.\"\"\"
    model = GPT().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for _ in range(steps):
        idx = torch.randint(0, VOCAB, (batch_size, CONTEXT), device="cuda")
        with torch.autocast("cuda", dtype=dtype):
            loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


batch_size = 8
"""

PLAN_CELL = """
model = GPT().cuda()
opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
for step in range(3):
    idx = torch.randint(0, VOCAB, (batch_size, CONTEXT), device="cuda")
    with torch.autocast("cuda", dtype=DTYPE):
        loss = model(idx, idx)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    print(f"step {step}: loss {loss.item():.3f}")
"""

PLAN = [
    (MD, """
# Plan for a GPU you do not have

Will a GPT-2-small-sized model (12 layers, width 768, 512-token context) train on a free Colab
T4, and at what batch size? And on an A100? `--dry-run` answers on this machine — no GPU, no
20 GB of memory — by running the unchanged training cell on *fake tensors*: shapes, dtypes and
sizes, no data, no compute. The report is a plan and says so.
"""),
    (CODE, "%load_ext gpumagic"),
    (CODE, PLAN_SETUP),
    (MD, """
## One cell, planned for a T4

The cell builds the model with `.cuda()` and makes its batches with `device="cuda"`: on a
machine without CUDA the dry run stands in for it and answers `torch.cuda` questions for the T4.
The T4 has no bfloat16, so the cell uses float16 autocast. `loss.item()` has no value in a plan:
it reads a placeholder, and the report names the line.
"""),
    (CODE, "DTYPE = torch.float16"),
    (CODE, "%%gpumem --dry-run --gpu T4\n" + PLAN_CELL.strip("\n")),
    (MD, """
## The same cell for an A100 (80 GB), in bfloat16

Nothing in the namespace changed: the dry run fake-copied what it needed and removed what the
cell created (`model` and `opt` do not exist here).
"""),
    (CODE, "print('model' in dir(), 'opt' in dir())\nDTYPE = torch.bfloat16"),
    (CODE, "%%gpumem --dry-run --gpu A100-80GB\n" + PLAN_CELL.strip("\n")),
    (MD, """
## The batch size for each GPU

`%find_batch --dry-run` plans every trial the same way (here on the cell as a function, `train`,
defined with the model at the top; two steps per trial: AdamW's state exists from the first); the
result says *planned* and the plot draws planned trials as hollow diamonds.
"""),
    (CODE, "res_t4 = %find_batch --dry-run --gpu T4 --var batch_size --steps 2 -o -- "
           "train(batch_size, torch.float16)"),
    (CODE, "res_a100 = %find_batch --dry-run --gpu A100-80GB --var batch_size --steps 2 -o -- "
           "train(batch_size, torch.bfloat16)"),
    (CODE, """
for name, res in (("T4", res_t4), ("A100-80GB", res_a100)):
    print(f"{name}: batch {res.recommended_batch_size} of {CONTEXT} tokens, planned peak "
          f"{format_bytes(res.predicted_peak_bytes)} of {format_bytes(res.capacity_bytes)} usable")
"""),
    (MD, """
## How far to trust a plan

On the CPU the same cell can be planned and measured; the exact tracker counts every tensor byte.
A small configuration, one step each:
"""),
    (CODE, """
small = "model = GPT(n_layer=2, d_model=128, heads=4)\\nopt = torch.optim.AdamW(model.parameters())\\n" \\
        "idx = torch.randint(0, VOCAB, (4, 64))\\nmodel(idx, idx).backward()\\nopt.step()"
plan = get_ipython().run_cell_magic("gpumem", "--dry-run -d cpu -o -q", small)
real = get_ipython().run_cell_magic("gpumem", "-d cpu -o -q", small)
print(f"planned {format_bytes(plan.peak_delta_bytes)}, measured {format_bytes(real.peak_delta_bytes)} "
      f"({100 * (plan.peak_delta_bytes / real.peak_delta_bytes - 1):+.2f}%)")
"""),
]


# -------------------------------------------------------------------------------------------------
# 07 which batch size trains best

SWEEP_SETUP = """
import torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
import gpumagic

torch.manual_seed(0)
X = torch.randn(6144, 32)
labels = (X @ torch.randn(32, 10) + 2.0 * torch.randn(6144, 10)).argmax(1)   # a noisy 10-class problem
train_data = TensorDataset(X[:4096], labels[:4096])
X_val, y_val = X[4096:], labels[4096:]
model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
batch_size = 64


def accuracy(model):
    with torch.no_grad():
        return (model(X_val).argmax(1) == y_val).float().mean().item()
"""

SWEEP_EPOCH = """
loader = DataLoader(train_data, batch_size=batch_size, shuffle=True)
for x, y in loader:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
"""

SWEEP = [
    (MD, """
# Which batch size trains best?

`%find_batch` answers *what fits*. This notebook asks the question the batch size is really
about: which size **trains best** for the samples (or the time) you spend. A larger batch uses
the hardware better and gives smoother gradients; a smaller one makes more updates per epoch.
The learning rate has to move with the batch, and the choice is made on validation data.

`%%batch_sweep` runs your unchanged training cell once per batch size, each run from the same
starting state, each seeing the same number of samples, and shows the loss curves side by side.
It also measures the *gradient noise scale* (McCandlish et al., 2018): the batch size above which
a larger batch buys few fewer steps. Everything runs on the CPU in under a minute.
"""),
    (CODE, "%load_ext gpumagic"),
    (CODE, SWEEP_SETUP),
    (MD, """
## The training cell, and what fits

One epoch of an ordinary loop at the cell's `batch_size = 64` and learning rate 0.05 (SGD with
momentum). `-d cpu --budget 8MiB` makes the CPU behave like an 8 MiB device, so that "what fits"
has an answer here.
"""),
    (CODE, "%%gpumem -d cpu --budget 8MiB" + SWEEP_EPOCH),
    (CODE, "%find_batch --var batch_size -d cpu --budget 8MiB"),
    (MD, """
## Which trains best

Three sizes, one epoch each (4,096 samples), the learning rate scaled linearly with the batch
(the rule for SGD; Adam-like optimizers get the square root), and the validation accuracy read
after each run. `-o` returns the `SweepResult`; `-q` leaves the showing to the notebook.
"""),
    (CODE, "weights_before = [p.detach().clone() for p in model.parameters()]"),
    (CODE, "%%batch_sweep --var batch_size --sizes 16,64,256 -d cpu --val \"accuracy(model)\" --val-name accuracy "
           "-o -q" + SWEEP_EPOCH),
    (CODE, """
res = _
res
"""),
    (CODE, """
print(f"recommended batch size {res.recommended}: {res.why}")
ns = res.noise_scale
print(f"noise scale {ns.value:,.0f} (10-90%: {ns.low:,.0f}-{ns.high:,.0f})")
for run in res.runs:
    print(f"batch {run.batch_size}: {run.total_samples} samples, lr {run.lrs[0]:.3g}, accuracy {run.val:.3f}")
"""),
    (MD, """
Nothing the sweep did is left behind: the weights, the optimizer, the random number generators
and `batch_size` are as they were before it.
"""),
    (CODE, """
print("batch_size is still", batch_size)
print("weights unchanged:", all(torch.equal(a, b) for a, b in zip(weights_before, model.parameters())))
"""),
]


NOTEBOOKS = {
    "01_quickstart.ipynb": notebook(QUICKSTART),
    "02_oom_advice.ipynb": notebook(OOM),
    "03_effective_batch.ipynb": notebook(EFFECTIVE),
    "04_loader_built_earlier.ipynb": notebook(LOADER),
    "05_colab_gpu.ipynb": notebook(COLAB, colab=True),
    "06_plan_for_a_gpu.ipynb": notebook(PLAN),
    "07_which_batch_size.ipynb": notebook(SWEEP),
}


def main() -> int:
    for name, nb in NOTEBOOKS.items():
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
