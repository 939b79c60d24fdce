"""Training loops from public tutorials and examples, adapted to run offline on CPU in a second.

Each entry is (setup run before the cell, the cell). Sources:

* ``mlp``: the PyTorch "Quickstart" tutorial (FashionMNIST ``NeuralNetwork``, 28*28-512-512-10,
  SGD), random images instead of the data set.
* ``cnn_bn``: pytorch/examples ``mnist/main.py``'s two-conv ``Net`` with ``BatchNorm2d`` after each
  convolution (as in the "Training a Classifier" CIFAR-10 tutorial's input size), Adam, a DataLoader.
* ``lstm``: pytorch/examples ``word_language_model`` (``RNNModel`` with an LSTM, truncated BPTT with
  ``repackage_hidden``, ``clip_grad_norm_``), a small vocabulary.
* ``transformer``: the "Language Modeling with nn.Transformer" tutorial's ``TransformerModel``
  (``nn.TransformerEncoder`` with a causal mask), AdamW.
* ``amp_bf16``: the "Automatic Mixed Precision" recipe's loop (``torch.autocast`` around forward
  and loss, MSE on an MLP), on cpu with bfloat16.
"""

from __future__ import annotations

CNN_BN_NET = """class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1); self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1); self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 8 * 8, 10)
    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(torch.flatten(x, 1))
"""
"""A small CNN with BatchNorm (the class only): the "cnn_bn" loop here, and what_if_loops' CNN."""

LOOPS: dict[str, tuple[str, str]] = {
    "mlp": ("""
import torch
from torch import nn
import torch.nn.functional as F
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                      nn.Linear(512, 10))
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
X = torch.randn(256, 1, 28, 28); Y = torch.randint(0, 10, (256,))
""", """
for i in range(0, 256, 64):
    pred = model(X[i:i + 64])
    loss = F.cross_entropy(pred, Y[i:i + 64])
    loss.backward(); opt.step(); opt.zero_grad()
"""),
    "cnn_bn": ("""
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
""" + CNN_BN_NET + """model = Net()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
loader = DataLoader(TensorDataset(torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))), batch_size=32)
""", """
model.train()
for x, y in loader:
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
"""),
    "lstm": ("""
import torch
from torch import nn
import torch.nn.functional as F
torch.manual_seed(0)
class RNNModel(nn.Module):
    def __init__(self, ntoken=500, ninp=64, nhid=128, nlayers=2):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=0.2)
        self.decoder = nn.Linear(nhid, ntoken)
        self.ntoken = ntoken
    def forward(self, inp, hidden):
        out, hidden = self.rnn(self.encoder(inp), hidden)
        return self.decoder(out).view(-1, self.ntoken), hidden
model = RNNModel()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
data = torch.randint(0, 500, (35 * 4 + 1, 16))
""", """
hidden = (torch.zeros(2, 16, 128), torch.zeros(2, 16, 128))
for i in range(0, 35 * 4, 35):
    x, y = data[i:i + 35], data[i + 1:i + 36].reshape(-1)
    hidden = tuple(h.detach() for h in hidden)
    model.zero_grad()
    out, hidden = model(x, hidden)
    loss = F.cross_entropy(out, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
    opt.step()
"""),
    "transformer": ("""
import torch
from torch import nn
import torch.nn.functional as F
torch.manual_seed(0)
class TransformerModel(nn.Module):
    def __init__(self, ntoken=1000, d_model=128, nhead=4, d_hid=256, nlayers=2, dropout=0.1):
        super().__init__()
        self.embedding = nn.Embedding(ntoken, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, d_hid, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, nlayers)
        self.linear = nn.Linear(d_model, ntoken)
    def forward(self, src, mask):
        return self.linear(self.encoder(self.embedding(src), mask, is_causal=True))
model = TransformerModel()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
tokens = torch.randint(0, 1000, (32, 65))
mask = nn.Transformer.generate_square_subsequent_mask(64)
""", """
model.train()
for i in range(0, 32, 8):
    src, tgt = tokens[i:i + 8, :-1], tokens[i:i + 8, 1:]
    out = model(src, mask)
    loss = F.cross_entropy(out.reshape(-1, 1000), tgt.reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()
"""),
    "amp_bf16": ("""
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 256))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
loss_fn = nn.MSELoss()
data = [torch.randn(64, 256) for _ in range(4)]
targets = [torch.randn(64, 256) for _ in range(4)]
""", """
for x, t in zip(data, targets):
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = loss_fn(out, t)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
"""),
}
