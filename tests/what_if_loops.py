"""Four training loops for the what-if plans, each with every remedy applied by hand.

``MODELS[name]`` is (setup, cell as written, {remedy name prefix: cell with it applied by hand}).
A remedy that is a change before the loop (checkpointing, another optimizer, foreach) is not
listed: the tests run the plan's own ``code`` literally, then the cell as written. Sources:

* ``mlp``: the PyTorch "Quickstart" tutorial's ``NeuralNetwork`` (smaller), with the older
  tutorials' ``zero_grad(set_to_none=False)`` and Adam with ``foreach=True``; random batches.
* ``cnn_bn``: pytorch/examples ``mnist/main.py``'s two-conv ``Net`` with ``BatchNorm2d`` (as in
  tests/dryrun_loops.py), SGD with momentum, batches from a DataLoader.
* ``encoder``: the "Language Modeling with nn.Transformer" tutorial's encoder
  (``nn.TransformerEncoder``, batch first), AdamW, random token batches.
* ``gpt``: a nanoGPT-style decoder (``Block``s of causal self-attention and an MLP in a
  ``ModuleList``, a vocabulary head), AdamW, random token batches.
"""

from __future__ import annotations

from dryrun_loops import CNN_BN_NET

_AUTOCAST = """
for step in range(6):
{batch}
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.{dtype}):
        out = {forward}
        loss = {loss}
{backward}
"""


def _variants(batch: str, forward: str, loss: str) -> dict[str, str]:
    plain = (f"for step in range(6):\n{batch}\n    opt.zero_grad()\n    out = {forward}\n    loss = {loss}\n"
             "    loss.backward()\n    opt.step()\n")
    scaled = "    scaler.scale(loss).backward(); scaler.step(opt); scaler.update()"
    # K micro-batches per optimizer step (the test puts the plan's K in): six optimizer steps
    acc = (f"for step in range(6 * K):\n{batch}\n    out = {forward}\n    loss = ({loss}) / K\n    loss.backward()\n"
           f"    if step % K == K - 1:\n        opt.step(); opt.zero_grad()\n")
    return {
        "": plain,
        "autocast (bfloat16)": _AUTOCAST.format(batch=batch, dtype="bfloat16", forward=forward, loss=loss,
                                                backward="    loss.backward()\n    opt.step()"),
        "autocast (float16)": 'scaler = torch.amp.GradScaler("cpu")\n' + _AUTOCAST.format(
            batch=batch, dtype="float16", forward=forward, loss=loss, backward=scaled),
        "zero_grad(set_to_none=True)": plain.replace("zero_grad(set_to_none=False)", "zero_grad(set_to_none=True)"),
        "free the previous step's outputs": plain + "    del out, loss\n",
        "gradient accumulation": acc,
    }


MODELS: dict[str, tuple[str, str, dict[str, str]]] = {}

_MLP_SETUP = """
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
bs = 64
"""
_v = _variants("    x, y = torch.randn(bs, 256), torch.randint(0, 10, (bs,))", "model(x)", "F.cross_entropy(out, y)")
_v = {k: v.replace("opt.zero_grad()", "opt.zero_grad(set_to_none=False)") for k, v in _v.items()}
_v["zero_grad(set_to_none=True)"] = _v[""].replace("set_to_none=False", "set_to_none=True")
MODELS["mlp"] = (_MLP_SETUP, _v[""], _v)

_CNN_SETUP = """
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
""" + CNN_BN_NET + """model = Net()
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
data = TensorDataset(torch.randn(768, 3, 32, 32), torch.randint(0, 10, (768,)))
loader = DataLoader(data, batch_size=32)
"""
_CNN_CELL = """
for step, (x, y) in enumerate(loader):
    if step == 6:
        break
    opt.zero_grad()
    out = model(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    opt.step()
"""
_c = _variants("    x, y = next(it)", "model(x)", "F.cross_entropy(out, y)")
# the iterator holds the loader and its data set: gone with the loop, or the next setup's baseline counts two
_c = {k: "it = iter(loader)\n" + v + "del it\n" for k, v in _c.items()}
MODELS["cnn_bn"] = (_CNN_SETUP, _CNN_CELL, _c)

_ENC_SETUP = """
torch.manual_seed(0)
class Encoder(nn.Module):
    def __init__(self, ntoken=200, d=64, nhead=4, nhid=128, nlayers=3):
        super().__init__()
        self.embed = nn.Embedding(ntoken, d)
        layer = nn.TransformerEncoderLayer(d, nhead, nhid, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.head = nn.Linear(d, ntoken)
    def forward(self, src):
        return self.head(self.encoder(self.embed(src)))
model = Encoder()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
bs = 16
"""
_e = _variants("    src = torch.randint(0, 200, (bs, 32))", "model(src)",
               "F.cross_entropy(out.reshape(-1, 200), src.reshape(-1))")
MODELS["encoder"] = (_ENC_SETUP, _e[""], _e)

_GPT_SETUP = """
torch.manual_seed(0)
class Block(nn.Module):
    def __init__(self, d, nhead):
        super().__init__()
        self.ln1 = nn.LayerNorm(d); self.qkv = nn.Linear(d, 3 * d); self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d); self.fc = nn.Linear(d, 4 * d); self.out = nn.Linear(4 * d, d)
        self.nhead = nhead
    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.nhead, C // self.nhead).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))
class GPT(nn.Module):
    def __init__(self, vocab=512, block=64, d=64, nhead=4, nlayer=4):
        super().__init__()
        self.wte = nn.Embedding(vocab, d); self.wpe = nn.Embedding(block, d)
        self.h = nn.ModuleList(Block(d, nhead) for _ in range(nlayer))
        self.ln_f = nn.LayerNorm(d); self.lm_head = nn.Linear(d, vocab, bias=False)
    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))
model = GPT()
opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
bs = 8
"""
_g = _variants("    idx = torch.randint(0, 512, (bs, 65))\n    x, y = idx[:, :-1], idx[:, 1:]", "model(x)",
               "F.cross_entropy(out.reshape(-1, 512), y.reshape(-1))")
MODELS["gpt"] = (_GPT_SETUP, _g[""], _g)
