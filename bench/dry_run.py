"""Dry runs at scale, on this CPU machine: a GPT-style model planned for GPUs it does not have.

1. ``gpt-1.3b``: 24 layers, width 2048, 16 heads, vocabulary 50304, context 1024 (~1.3B parameters),
   built inside the planned cell with ``.cuda()``, one AdamW step at batch 8 x 1024 tokens under
   bfloat16 autocast, planned with ``%%gpumem --dry-run -d cuda --gpu A100-80GB``.
   Goals: <= 90 s, <= 1 GiB of host memory growth.
2. ``gpt-150m``: 12 layers, width 768 (~124M parameters plus embeddings, ~150M), searched with
   ``%find_batch --dry-run --gpu T4 --var batch_size``. Goal: <= 120 s.

Each runs in a fresh interpreter with a real IPython shell; host memory growth is the peak
resident set size during the run minus the resident size just before it.

    python bench/dry_run.py [--only gpt-1.3b|gpt-150m]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

MODEL = r'''
import math, torch
from torch import nn
import torch.nn.functional as F

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
    def __init__(self, layers, d, heads, vocab=50304, ctx=1024):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
'''

CHILD = r'''
import json, os, resource, sys, time
from IPython.testing.globalipapp import start_ipython
ip = start_ipython()
ip.run_line_magic("load_ext", "gpumagic")
ip.run_cell(MODEL)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
t0 = time.perf_counter()
r = ip.run_cell(CELL)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
res = r.result
out = {"seconds": dt, "host_growth": peak - before, "error": repr(r.error_in_exec) if r.error_in_exec else None}
if res is not None and hasattr(res, "peak_bytes"):
    out.update(peak=res.peak_bytes, reserved=res.reserved_peak_bytes, params=res.breakdown.parameters_bytes,
               fits=res.headroom_bytes is not None and res.headroom_bytes >= 0)
elif res is not None:
    out.update(recommended=res.recommended_batch_size, max=res.max_batch_size, trials=len(res.trials),
               capacity=res.capacity_bytes)
print("RESULT " + json.dumps(out))
'''

CASES = {
    "gpt-1.3b": '''%%gpumem --dry-run -d cuda --gpu A100-80GB --steps 1 -o -q
model = GPT(24, 2048, 16).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
idx = torch.randint(0, 50304, (8, 1024), device="cuda")
with torch.autocast("cuda", dtype=torch.bfloat16):
    loss = model(idx, idx)
loss.backward()
opt.step()
opt.zero_grad(set_to_none=True)
''',
    "gpt-150m": '''%%find_batch --dry-run --gpu T4 --var batch_size -o -q
model = GPT(12, 768, 12).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
for _ in range(3):
    idx = torch.randint(0, 50304, (batch_size, 1024), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(idx, idx)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
''',
}


def run(name: str) -> dict[str, object]:
    code = f"MODEL = {MODEL!r}\nCELL = {CASES[name]!r}\n" + CHILD
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result: dict[str, object] = json.loads(line[7:])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(CASES), default=None)
    args = ap.parse_args()
    gib = 2**30
    for name in [args.only] if args.only else list(CASES):
        r = run(name)
        extra = ""
        if "peak" in r:
            extra = (f"planned peak {r['peak'] / gib:.2f} GiB, reserved {r['reserved'] / gib:.2f} GiB, "  # type: ignore[operator]
                     f"parameters {r['params'] / gib:.2f} GiB, fits {r['fits']}")  # type: ignore[operator]
        elif "recommended" in r:
            extra = f"recommended {r['recommended']}, largest planned to fit {r['max']}, {r['trials']} planned trials"
        print(f"{name}: {r['seconds']:.1f} s, host memory growth {r['host_growth'] / gib:.2f} GiB; {extra}"  # type: ignore[operator]
              + (f"; error {r['error']}" if r["error"] else ""))


if __name__ == "__main__":
    main()
