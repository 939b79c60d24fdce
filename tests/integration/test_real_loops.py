"""Real training loops written by others, run unchanged under %%gpumem and %%find_batch.

Each loop is copied from its source (noted above it) and adapted only to run offline on CPU in
seconds: random data instead of downloads, smaller widths, fewer batches. The training code
itself (model, collate function, loop body, logging) is the original's. Under ``%%gpumem`` the
per-step losses are the loop's own values; under ``%%find_batch`` the namespace is left as it was.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

BUDGET = "--budget 64MiB"


def run(ip, src):
    return ip.run_cell(src, store_history=True)


@pytest.fixture(autouse=True)
def _forget_results(ip):
    """The searches and reports here are not the notebook story of later tests (OOM advice reads them)."""
    yield
    presenter = ip.magics_manager.registry["GPUMagics"].presenter
    presenter.last_search = presenter.last_report = None


def setup(ip, src: str) -> None:
    r = run(ip, src)
    assert r.error_in_exec is None, r.error_in_exec


def gpumem(ip, cell: str):
    r = run(ip, "%%gpumem -o -q -d cpu\n" + cell)
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result.incomplete is None
    return r.result


def state_of(ns: dict[str, Any]) -> dict[str, Any]:
    """What %%find_batch must leave as it was: bindings, tensors, models, optimizers, plain values."""
    out: dict[str, Any] = {}
    for name, v in ns.items():
        if name.startswith("_") or name in ("In", "Out", "exit", "quit", "get_ipython"):
            continue
        if isinstance(v, torch.Tensor):
            out[name] = (id(v), v.detach().clone())
        elif isinstance(v, torch.nn.Module):
            out[name] = (id(v), {k: t.detach().clone() for k, t in v.state_dict().items()})
        elif isinstance(v, torch.optim.Optimizer):
            out[name] = (id(v), repr(v.state_dict()))
        elif isinstance(v, (int, float, str, list, dict, tuple)):
            out[name] = (id(v), repr(v))
        else:
            out[name] = (id(v), None)
    return out


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert set(after) == set(before)
    for name, (ident, value) in before.items():
        assert after[name][0] == ident, name
        other = after[name][1]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), name
        elif isinstance(value, dict) and value and all(isinstance(t, torch.Tensor) for t in value.values()):
            assert all(torch.equal(t, other[k]) for k, t in value.items()), name
        else:
            assert value == other, name


def find_batch(ip, cell: str, options: str):
    before = state_of(ip.user_ns)
    r = run(ip, f"%%find_batch -q -o -d cpu {BUDGET} {options}\n" + cell)
    assert r.error_in_exec is None, r.error_in_exec
    assert_same_state(before, state_of(ip.user_ns))
    return r.result


# --- 1. sparse embeddings, a custom collate_fn and .item() every step -----------------------------
# PyTorch tutorial "Text Classification with TorchText" (2020, PyTorch 1.6/1.7 edition),
# https://pytorch.org/tutorials/beginner/text_sentiment_ngrams_tutorial.html
# (TextSentiment with nn.EmbeddingBag(sparse=True), generate_batch, train_func, SGD lr=4.0, StepLR).
# Adapted: random token sequences of random length instead of AG_NEWS; smaller vocabulary.

TEXT_CLASSIFICATION = '''
from torch.utils.data import DataLoader
torch.manual_seed(0)
VOCAB_SIZE, EMBED_DIM, NUN_CLASS, BATCH_SIZE = 2000, 32, 4, 16
sub_train_ = [(int(torch.randint(0, NUN_CLASS, ())), torch.randint(0, VOCAB_SIZE, (int(torch.randint(5, 40, ())),)))
              for _ in range(96)]

class TextSentiment(nn.Module):
    def __init__(self, vocab_size, embed_dim, num_class):
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab_size, embed_dim, sparse=True)
        self.fc = nn.Linear(embed_dim, num_class)
        self.init_weights()

    def init_weights(self):
        initrange = 0.5
        self.embedding.weight.data.uniform_(-initrange, initrange)
        self.fc.weight.data.uniform_(-initrange, initrange)
        self.fc.bias.data.zero_()

    def forward(self, text, offsets):
        embedded = self.embedding(text, offsets)
        return self.fc(embedded)

def generate_batch(batch):
    label = torch.tensor([entry[0] for entry in batch])
    text = [entry[1] for entry in batch]
    offsets = [0] + [len(entry) for entry in text]
    offsets = torch.tensor(offsets[:-1]).cumsum(dim=0)
    text = torch.cat(text)
    return text, offsets, label

device = torch.device("cpu")
model = TextSentiment(VOCAB_SIZE, EMBED_DIM, NUN_CLASS).to(device)
criterion = torch.nn.CrossEntropyLoss().to(device)
optimizer = torch.optim.SGD(model.parameters(), lr=4.0)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.9)

def train_func(sub_train_):
    # Train the model
    train_loss = 0
    train_acc = 0
    data = DataLoader(sub_train_, batch_size=BATCH_SIZE, shuffle=True, collate_fn=generate_batch)
    for i, (text, offsets, cls) in enumerate(data):
        optimizer.zero_grad()
        text, offsets, cls = text.to(device), offsets.to(device), cls.to(device)
        output = model(text, offsets)
        loss = criterion(output, cls)
        train_loss += loss.item()
        loss.backward()
        optimizer.step()
        train_acc += (output.argmax(1) == cls).sum().item()

    # Adjust the learning rate
    scheduler.step()

    return train_loss / len(sub_train_), train_acc / len(sub_train_)
'''


def test_text_classification_with_sparse_embedding_bag_records_its_losses(ip, clean_ns):
    setup(ip, TEXT_CLASSIFICATION)
    rep = gpumem(ip, "train_loss, train_acc = train_func(sub_train_)\n")
    assert rep.total_steps == 6
    assert [s.batch_size for s in rep.steps] == [16] * 6  # samples, not tokens
    assert sum(rep.losses) / 96 == pytest.approx(ip.user_ns["train_loss"])


def test_text_classification_with_sparse_embedding_bag_is_searched_and_restored(ip, clean_ns):
    setup(ip, TEXT_CLASSIFICATION)
    res = find_batch(ip, "train_loss, train_acc = train_func(sub_train_)\n", "--var BATCH_SIZE")
    assert res.max_batch_size == 96  # the whole data set: one batch holds it
    assert not res.oom_count


# --- 2. a hidden state carried across batches, manual SGD, no optimizer ------------------------------
# pytorch/examples, word_language_model: model.py (RNNModel) and main.py (batchify, get_batch,
# repackage_hidden, train), https://github.com/pytorch/examples/tree/main/word_language_model
# Adapted: a random token stream instead of Wikitext-2; LSTM only; tiny sizes; one epoch of 6 batches.

WORD_LANGUAGE_MODEL = '''
import math
torch.manual_seed(0)

class RNNModel(nn.Module):
    """Container module with an encoder, a recurrent module, and a decoder."""

    def __init__(self, rnn_type, ntoken, ninp, nhid, nlayers, dropout=0.5, tie_weights=False):
        super(RNNModel, self).__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.init_weights()
        self.rnn_type = rnn_type
        self.nhid = nhid
        self.nlayers = nlayers

    def init_weights(self):
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output)
        decoded = decoded.view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid),
                weight.new_zeros(self.nlayers, bsz, self.nhid))

def batchify(data, bsz):
    nbatch = data.size(0) // bsz
    data = data.narrow(0, 0, nbatch * bsz)
    data = data.view(bsz, -1).t().contiguous()
    return data.to(device)

def get_batch(source, i):
    seq_len = min(bptt, len(source) - 1 - i)
    data = source[i:i+seq_len]
    target = source[i+1:i+1+seq_len].view(-1)
    return data, target

def repackage_hidden(h):
    if isinstance(h, torch.Tensor):
        return h.detach()
    else:
        return tuple(repackage_hidden(v) for v in h)

device = torch.device("cpu")
ntokens, bptt, lr, clip, eval_batch_size = 500, 7, 20.0, 0.25, 10
train_batch_size = 8
corpus_train = torch.randint(0, ntokens, (8 * 43,))
model = RNNModel("LSTM", ntokens, 16, 16, 2, 0.2).to(device)
criterion = nn.NLLLoss()

def train():
    # Turn on training mode which enables dropout.
    model.train()
    total_loss = 0.
    hidden = model.init_hidden(train_batch_size)
    for batch, i in enumerate(range(0, train_data.size(0) - 1, bptt)):
        data, targets = get_batch(train_data, i)
        # Starting each batch, we detach the hidden state from how it was previously produced.
        # If we didn't, the model would try backpropagating all the way to start of the dataset.
        model.zero_grad()
        hidden = repackage_hidden(hidden)
        output, hidden = model(data, hidden)
        loss = criterion(output, targets)
        loss.backward()

        # `clip_grad_norm` helps prevent the exploding gradient problem in RNNs / LSTMs.
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)

        total_loss += loss.item()
    return total_loss
'''


def test_word_language_model_with_hidden_state_records_one_step_per_backward(ip, clean_ns):
    setup(ip, WORD_LANGUAGE_MODEL)
    rep = gpumem(ip, "train_data = batchify(corpus_train, train_batch_size)\ntotal_loss = train()\n")
    assert rep.total_steps == 6  # 43 rows of tokens, bptt 7: six batches, each backward is a step
    assert sum(rep.losses) == pytest.approx(ip.user_ns["total_loss"])


def test_word_language_model_with_hidden_state_is_searched_and_restored(ip, clean_ns):
    setup(ip, WORD_LANGUAGE_MODEL + "train_data = batchify(corpus_train, train_batch_size)\n")
    res = find_batch(ip, "train_data = batchify(corpus_train, train_batch_size)\ntotal_loss = train()\n",
                     "--var train_batch_size --max 32")
    assert res.max_batch_size == 32
    assert res.fit is not None
    assert res.fit.bytes_per_sample > 0


# --- 3. variable-length data padded by a collate_fn, .item() logged every step ----------------------
# PyTorch tutorial "Speech Command Classification with torchaudio",
# https://pytorch.org/tutorials/intermediate/speech_command_classification_with_torchaudio_tutorial.html
# (pad_sequence, collate_fn, the M5 network, train with F.nll_loss and losses.append(loss.item())).
# Adapted: random waveforms of 6000-8000 samples instead of SpeechCommands; n_channel 8; no resampling
# transform (identity); no tqdm bar.

SPEECH_COMMANDS = '''
from torch.utils.data import DataLoader
torch.manual_seed(0)
labels = ["yes", "no", "up", "down"]
train_set = [(torch.randn(1, int(torch.randint(6000, 8001, ()))), 8000, labels[i % 4], i, 0) for i in range(48)]
device = torch.device("cpu")
transform = lambda x: x

def label_to_index(word):
    # Return the position of the word in labels
    return torch.tensor(labels.index(word))

def pad_sequence(batch):
    # Make all tensor in a batch the same length by padding with zeros
    batch = [item.t() for item in batch]
    batch = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=0.)
    return batch.permute(0, 2, 1)

def collate_fn(batch):
    # A data tuple has the form:
    # waveform, sample_rate, label, speaker_id, utterance_number
    tensors, targets = [], []
    # Gather in lists, and encode labels as indices
    for waveform, _, label, *_ in batch:
        tensors += [waveform]
        targets += [label_to_index(label)]
    # Group the list of tensors into a batched tensor
    tensors = pad_sequence(tensors)
    targets = torch.stack(targets)
    return tensors, targets

class M5(nn.Module):
    def __init__(self, n_input=1, n_output=35, stride=16, n_channel=32):
        super().__init__()
        self.conv1 = nn.Conv1d(n_input, n_channel, kernel_size=80, stride=stride)
        self.bn1 = nn.BatchNorm1d(n_channel)
        self.pool1 = nn.MaxPool1d(4)
        self.conv2 = nn.Conv1d(n_channel, n_channel, kernel_size=3)
        self.bn2 = nn.BatchNorm1d(n_channel)
        self.pool2 = nn.MaxPool1d(4)
        self.conv3 = nn.Conv1d(n_channel, 2 * n_channel, kernel_size=3)
        self.bn3 = nn.BatchNorm1d(2 * n_channel)
        self.pool3 = nn.MaxPool1d(4)
        self.conv4 = nn.Conv1d(2 * n_channel, 2 * n_channel, kernel_size=3)
        self.bn4 = nn.BatchNorm1d(2 * n_channel)
        self.pool4 = nn.MaxPool1d(1)
        self.fc1 = nn.Linear(2 * n_channel, n_output)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(self.bn1(x))
        x = self.pool1(x)
        x = self.conv2(x)
        x = F.relu(self.bn2(x))
        x = self.pool2(x)
        x = self.conv3(x)
        x = F.relu(self.bn3(x))
        x = self.pool3(x)
        x = self.conv4(x)
        x = F.relu(self.bn4(x))
        x = self.pool4(x)
        x = F.avg_pool1d(x, x.shape[-1])
        x = x.permute(0, 2, 1)
        x = self.fc1(x)
        return F.log_softmax(x, dim=2)

model = M5(n_input=1, n_output=len(labels), n_channel=8)
model.to(device)
optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.0001)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.1)
batch_size = 8
log_interval = 20
losses = []

def train(model, epoch, log_interval):
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):

        data = data.to(device)
        target = target.to(device)

        # apply transform and model on whole batch directly on device
        data = transform(data)
        output = model(data)

        # negative log-likelihood for a tensor of size (batch x 1 x n_output)
        loss = F.nll_loss(output.squeeze(), target)

        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        # print training stats
        if batch_idx % log_interval == 0:
            print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(train_loader.dataset)} "
                  f"({100. * batch_idx / len(train_loader):.0f}%)]\\tLoss: {loss.item():.6f}")

        # record loss
        losses.append(loss.item())
'''

SPEECH_CELL = (
    "train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, collate_fn=collate_fn)\n"
    "train(model, 1, log_interval)\nscheduler.step()\n"
)


def test_speech_commands_with_padding_collate_records_the_logged_losses(ip, clean_ns):
    setup(ip, SPEECH_COMMANDS)
    rep = gpumem(ip, SPEECH_CELL)
    assert list(rep.losses) == pytest.approx(ip.user_ns["losses"])
    assert [s.batch_size for s in rep.steps] == [8] * 6


def test_speech_commands_with_padding_collate_is_searched_and_restored(ip, clean_ns):
    setup(ip, SPEECH_COMMANDS)
    res = find_batch(ip, SPEECH_CELL, "--var batch_size --max 32")
    assert res.max_batch_size == 32
    assert ip.user_ns["losses"] == []


# --- 4. a loop inside Lightning's Trainer.fit ---------------------------------------------------------
# Lightning README, "Step 1: Add these imports / Step 2: Define a LightningModule / Step 3: Train"
# (LitAutoEncoder), https://github.com/Lightning-AI/pytorch-lightning#pytorch-lightning-train-and-deploy-pytorch-at-scale
# Adapted: random 28x28 images instead of MNIST; one epoch of 4 batches; no logger, checkpoints or bar.
# The losses are read by a callback (the module is unchanged).

LIGHTNING = '''
import lightning as L
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)

# define any number of nn.Modules (or use your current ones)
encoder = nn.Sequential(nn.Linear(28 * 28, 64), nn.ReLU(), nn.Linear(64, 3))
decoder = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 28 * 28))

# define the LightningModule
class LitAutoEncoder(L.LightningModule):
    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def training_step(self, batch, batch_idx):
        # training_step defines the train loop.
        # it is independent of forward
        x, _ = batch
        x = x.view(x.size(0), -1)
        z = self.encoder(x)
        x_hat = self.decoder(z)
        loss = F.mse_loss(x_hat, x)
        # Logging to TensorBoard (if installed) by default
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        return optimizer

# init the autoencoder
autoencoder = LitAutoEncoder(encoder, decoder)
dataset = TensorDataset(torch.rand(64, 1, 28, 28), torch.zeros(64))
bs = 16
seen = []

class Losses(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        seen.append(outputs["loss"].item())
'''

LIGHTNING_CELL = '''
train_loader = DataLoader(dataset, batch_size=bs)
trainer = L.Trainer(limit_train_batches=4, max_epochs=1, accelerator="cpu", logger=False, callbacks=[Losses()],
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model=autoencoder, train_dataloaders=train_loader)
'''


@pytest.mark.filterwarnings("ignore")  # Lightning's own advice (workers, logging) is not under test
def test_lightning_autoencoder_fit_records_the_losses_of_training_step(ip, clean_ns):
    pytest.importorskip("lightning")
    setup(ip, LIGHTNING)
    rep = gpumem(ip, LIGHTNING_CELL)
    assert list(rep.losses) == pytest.approx(ip.user_ns["seen"])
    assert rep.total_steps == 4


@pytest.mark.filterwarnings("ignore")
def test_lightning_autoencoder_fit_is_searched_and_restored(ip, clean_ns):
    pytest.importorskip("lightning")
    setup(ip, LIGHTNING)
    res = find_batch(ip, LIGHTNING_CELL, "--var bs --max 64")
    assert res.max_batch_size == 64


# --- 5. a GAN: two optimizers per iteration ---------------------------------------------------------
# PyTorch tutorial "DCGAN Tutorial", https://pytorch.org/tutorials/beginner/dcgan_faces_tutorial.html
# (weights_init, Generator, Discriminator, the training loop with optimizerD and optimizerG).
# Adapted: random 64x64 images instead of CelebA; nz=8, ngf=ndf=4; 3 iterations; no printing.
# How gpumagic counts it (README, "Steps and losses"): D and G each update after their own
# backward(), so one iteration is two steps, D's then G's; D's step loss is the sum of the two
# values backward was called on (errD_real, errD_fake), the tutorial's errD; G's is errG. Both
# steps' batch size is the loader's batch (4): backward calls on one drawn batch count its samples once.

DCGAN = '''
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
device = torch.device("cpu")
nc, nz, ngf, ndf, ngpu, lr, beta1, num_epochs, batch_size = 3, 8, 4, 4, 0, 0.0002, 0.5, 1, 4
dataset = TensorDataset(torch.rand(12, nc, 64, 64) * 2 - 1, torch.zeros(12))

def weights_init(m):
    classname = m.__class__.__name__
    if classname.find('Conv') != -1:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif classname.find('BatchNorm') != -1:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)

class Generator(nn.Module):
    def __init__(self, ngpu):
        super(Generator, self).__init__()
        self.ngpu = ngpu
        self.main = nn.Sequential(
            nn.ConvTranspose2d( nz, ngf * 8, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d( ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d( ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d( ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh()
        )

    def forward(self, input):
        return self.main(input)

class Discriminator(nn.Module):
    def __init__(self, ngpu):
        super(Discriminator, self).__init__()
        self.ngpu = ngpu
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
            nn.Sigmoid()
        )

    def forward(self, input):
        return self.main(input)

netG = Generator(ngpu).to(device)
netG.apply(weights_init)
netD = Discriminator(ngpu).to(device)
netD.apply(weights_init)
criterion = nn.BCELoss()
fixed_noise = torch.randn(64, nz, 1, 1, device=device)
real_label = 1.
fake_label = 0.
optimizerD = torch.optim.Adam(netD.parameters(), lr=lr, betas=(beta1, 0.999))
optimizerG = torch.optim.Adam(netG.parameters(), lr=lr, betas=(beta1, 0.999))
img_list = []
G_losses = []
D_losses = []
iters = 0
'''

DCGAN_CELL = '''
dataloader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
for epoch in range(num_epochs):
    # For each batch in the dataloader
    for i, data in enumerate(dataloader, 0):

        ############################
        # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
        ###########################
        ## Train with all-real batch
        netD.zero_grad()
        # Format batch
        real_cpu = data[0].to(device)
        b_size = real_cpu.size(0)
        label = torch.full((b_size,), real_label, dtype=torch.float, device=device)
        # Forward pass real batch through D
        output = netD(real_cpu).view(-1)
        # Calculate loss on all-real batch
        errD_real = criterion(output, label)
        # Calculate gradients for D in backward pass
        errD_real.backward()
        D_x = output.mean().item()

        ## Train with all-fake batch
        # Generate batch of latent vectors
        noise = torch.randn(b_size, nz, 1, 1, device=device)
        # Generate fake image batch with G
        fake = netG(noise)
        label.fill_(fake_label)
        # Classify all fake batch with D
        output = netD(fake.detach()).view(-1)
        # Calculate D's loss on the all-fake batch
        errD_fake = criterion(output, label)
        # Calculate the gradients for this batch, accumulated (summed) with previous gradients
        errD_fake.backward()
        D_G_z1 = output.mean().item()
        # Compute error of D as sum over the fake and the real batches
        errD = errD_real + errD_fake
        # Update D
        optimizerD.step()

        ############################
        # (2) Update G network: maximize log(D(G(z)))
        ###########################
        netG.zero_grad()
        label.fill_(real_label)  # fake labels are real for generator cost
        # Since we just updated D, perform another forward pass of all-fake batch through D
        output = netD(fake).view(-1)
        # Calculate G's loss based on this output
        errG = criterion(output, label)
        # Calculate gradients for G
        errG.backward()
        D_G_z2 = output.mean().item()
        # Update G
        optimizerG.step()

        # Save Losses for plotting later
        G_losses.append(errG.item())
        D_losses.append(errD.item())

        iters += 1
'''


def test_dcgan_counts_two_steps_per_iteration_with_the_documented_losses(ip, clean_ns):
    setup(ip, DCGAN)
    rep = gpumem(ip, DCGAN_CELL)
    d, g = ip.user_ns["D_losses"], ip.user_ns["G_losses"]
    assert rep.total_steps == 2 * len(g) == 6
    expected = [v for pair in zip(d, g, strict=True) for v in pair]  # D, G, D, G, ...
    assert list(rep.losses) == pytest.approx(expected, rel=1e-6)
    assert [s.batch_size for s in rep.steps] == [4] * 6


def test_dcgan_is_searched_and_restored(ip, clean_ns):
    setup(ip, DCGAN)
    res = find_batch(ip, DCGAN_CELL, "--var batch_size --max 12")
    assert res.max_batch_size == 12
    assert ip.user_ns["G_losses"] == []
    assert ip.user_ns["iters"] == 0


# --- 6. a torch.compile'd model -----------------------------------------------------------------------
# PyTorch "Learn the Basics" quickstart (NeuralNetwork, train) with torch.compile as in
# "Introduction to torch.compile", https://pytorch.org/tutorials/beginner/basics/quickstart_tutorial.html
# and https://pytorch.org/tutorials/intermediate/torch_compile_tutorial.html
# Adapted: random 28x28 images instead of FashionMNIST; width 64; the "aot_eager" backend (no C++
# build, seconds instead of a minute on two cores); 4 batches.

COMPILED = '''
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
device = "cpu"
training_data = TensorDataset(torch.rand(64, 28, 28), torch.randint(0, 10, (64,)))
batch_size = 16

class NeuralNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28*28, 64),
            nn.ReLU(),
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Linear(64, 10)
        )

    def forward(self, x):
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits

model = NeuralNetwork().to(device)
model = torch.compile(model, backend="aot_eager")
loss_fn = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
printed = []

def train(dataloader, model, loss_fn, optimizer):
    size = len(dataloader.dataset)
    model.train()
    for batch, (X, y) in enumerate(dataloader):
        X, y = X.to(device), y.to(device)

        # Compute prediction error
        pred = model(X)
        loss = loss_fn(pred, y)

        # Backpropagation
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

        loss, current = loss.item(), (batch + 1) * len(X)
        printed.append(loss)
'''

COMPILED_CELL = "train_dataloader = DataLoader(training_data, batch_size=batch_size)\n" \
                "train(train_dataloader, model, loss_fn, optimizer)\n"


@pytest.mark.own_process
def test_compiled_quickstart_records_its_losses(ip, clean_ns):
    setup(ip, COMPILED)
    rep = gpumem(ip, COMPILED_CELL)
    assert list(rep.losses) == pytest.approx(ip.user_ns["printed"])
    assert rep.total_steps == 4


# dynamo's own weakref callbacks can fail when its caches are collected (an "Exception ignored in
# ExactWeakKeyDictionary" at gc, KeyError '__builtins_dict___0'): torch's noise, not the cell's.
# Both compiled tests run in their own process (conftest), so it cannot reach other tests.
@pytest.mark.own_process
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_compiled_quickstart_is_searched_and_restored(ip, clean_ns):
    setup(ip, COMPILED)
    res = find_batch(ip, COMPILED_CELL, "--var batch_size --max 64")
    assert res.max_batch_size == 64
