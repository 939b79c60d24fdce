"""Steps and losses by rule, on loops written by others (source noted above each), in a real shell.

The rules (README, "Steps and losses"): a step is one update of the model (optimizers stepping one
after another with no backward() between them are one step); a step's loss is the loss whose
gradient the step applied, the sum of the values backward() was called on since the previous
step (GradScaler's scale undone), or the value ``optimizer.step(closure)`` returns.
Each loop is adapted only to run offline on CPU in a second: random data, small widths.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _forget_results(ip):
    yield
    presenter = ip.magics_manager.registry["GPUMagics"].presenter
    presenter.last_search = presenter.last_report = None


def setup(ip, src: str) -> None:
    r = ip.run_cell(src, store_history=True)
    assert r.error_in_exec is None, r.error_in_exec


def gpumem(ip, cell: str):
    r = ip.run_cell("%%gpumem -o -q -d cpu\n" + cell, store_history=True)
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result.incomplete is None
    return r.result


# --- an encoder's and a decoder's optimizer after one backward() --------------------------------
# PyTorch tutorial "NLP From Scratch: Translation with a Sequence to Sequence Network and
# Attention" (EncoderRNN, DecoderRNN, train_epoch),
# https://pytorch.org/tutorials/intermediate/seq2seq_translation_tutorial.html
# Adapted: random token ids instead of the English-French pairs; hidden size 16; 6 pairs.
SEQ2SEQ = '''
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
SOS_token, MAX_LENGTH, hidden_size, n_words = 0, 5, 16, 20

class EncoderRNN(nn.Module):
    def __init__(self, input_size, hidden_size, dropout_p=0.1):
        super(EncoderRNN, self).__init__()
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(input_size, hidden_size)
        self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, input):
        embedded = self.dropout(self.embedding(input))
        output, hidden = self.gru(embedded)
        return output, hidden

class DecoderRNN(nn.Module):
    def __init__(self, hidden_size, output_size):
        super(DecoderRNN, self).__init__()
        self.embedding = nn.Embedding(output_size, hidden_size)
        self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True)
        self.out = nn.Linear(hidden_size, output_size)

    def forward(self, encoder_outputs, encoder_hidden, target_tensor=None):
        batch_size = encoder_outputs.size(0)
        decoder_input = torch.empty(batch_size, 1, dtype=torch.long).fill_(SOS_token)
        decoder_hidden = encoder_hidden
        decoder_outputs = []
        for i in range(MAX_LENGTH):
            decoder_output, decoder_hidden = self.forward_step(decoder_input, decoder_hidden)
            decoder_outputs.append(decoder_output)
            if target_tensor is not None:
                decoder_input = target_tensor[:, i].unsqueeze(1)  # Teacher forcing
            else:
                _, topi = decoder_output.topk(1)
                decoder_input = topi.squeeze(-1).detach()
        decoder_outputs = torch.cat(decoder_outputs, dim=1)
        decoder_outputs = F.log_softmax(decoder_outputs, dim=-1)
        return decoder_outputs, decoder_hidden, None

    def forward_step(self, input, hidden):
        output = self.embedding(input)
        output = F.relu(output)
        output, hidden = self.gru(output, hidden)
        output = self.out(output)
        return output, hidden

pairs = TensorDataset(torch.randint(1, n_words, (6, MAX_LENGTH)), torch.randint(1, n_words, (6, MAX_LENGTH)))
train_dataloader = DataLoader(pairs, batch_size=2)
encoder = EncoderRNN(n_words, hidden_size)
decoder = DecoderRNN(hidden_size, n_words)
encoder_optimizer = torch.optim.Adam(encoder.parameters(), lr=0.001)
decoder_optimizer = torch.optim.Adam(decoder.parameters(), lr=0.001)
criterion = nn.NLLLoss()
logged = []

def train_epoch(dataloader, encoder, decoder, encoder_optimizer, decoder_optimizer, criterion):
    total_loss = 0
    for data in dataloader:
        input_tensor, target_tensor = data

        encoder_optimizer.zero_grad()
        decoder_optimizer.zero_grad()

        encoder_outputs, encoder_hidden = encoder(input_tensor)
        decoder_outputs, _, _ = decoder(encoder_outputs, encoder_hidden, target_tensor)

        loss = criterion(
            decoder_outputs.view(-1, decoder_outputs.size(-1)),
            target_tensor.view(-1)
        )
        loss.backward()

        encoder_optimizer.step()
        decoder_optimizer.step()

        total_loss += loss.item()
        logged.append(loss.item())  # added: the tutorial only sums them
    return total_loss / len(dataloader)
'''


def test_encoder_and_decoder_optimizers_after_one_backward_are_one_step(ip, clean_ns):
    setup(ip, SEQ2SEQ)
    rep = gpumem(ip, "train_epoch(train_dataloader, encoder, decoder, encoder_optimizer, decoder_optimizer, criterion)")
    logged = ip.user_ns["logged"]
    assert rep.total_steps == len(logged) == 3
    assert list(rep.losses) == pytest.approx(logged, rel=1e-6)
    assert [s.batch_size for s in rep.steps] == [2, 2, 2]


def test_encoder_decoder_step_holds_both_optimizers_state_in_its_peak(ip, clean_ns):
    setup(ip, SEQ2SEQ)
    rep = gpumem(ip, "train_epoch(train_dataloader, encoder, decoder, encoder_optimizer, decoder_optimizer, criterion)")
    b = rep.breakdown
    params = sum(p.numel() * 4 for m in ("encoder", "decoder") for p in ip.user_ns[m].parameters())
    assert b is not None
    assert b.parameters_bytes == params  # both optimizers' parameters: the step is theirs together
    assert 2 * params <= b.optimizer_state_bytes < 2 * params + 1024  # Adam's exp_avg, exp_avg_sq (and step) for both


def test_a_trial_of_the_encoder_decoder_loop_ends_after_both_optimizers(ip, clean_ns):
    setup(ip, SEQ2SEQ)
    from gpumagic.tracking import StopTrial, Tracker

    ns = ip.user_ns
    stepped: list[str] = []
    hooks = [ns["encoder_optimizer"].register_step_post_hook(lambda *a: stepped.append("enc")),
             ns["decoder_optimizer"].register_step_post_hook(lambda *a: stepped.append("dec"))]
    try:
        with pytest.raises(StopTrial), Tracker("cpu", stop_after_steps=2, gather_ranks=False):
            ns["train_epoch"](ns["train_dataloader"], ns["encoder"], ns["decoder"], ns["encoder_optimizer"],
                              ns["decoder_optimizer"], ns["criterion"])
    finally:
        for h in hooks:
            h.remove()
    assert stepped == ["enc", "dec", "enc", "dec"]


# --- two loss terms, each backward'ed before one step() -----------------------------------------
# PyTorch tutorial "DCGAN Tutorial" (the discriminator's update),
# https://pytorch.org/tutorials/beginner/dcgan_faces_tutorial.html — tests/test_real_loops.py
# runs the whole loop; this is its D update on a linear D, which the tutorial logs as
# errD = errD_real + errD_fake.
GAN_D = '''
torch.manual_seed(0)
netD = nn.Sequential(nn.Linear(8, 1), nn.Sigmoid())
optimizerD = torch.optim.Adam(netD.parameters(), lr=0.0002, betas=(0.5, 0.999))
criterion = nn.BCELoss()
real_label, fake_label = 1., 0.
D_losses = []
'''
GAN_D_CELL = '''
for i in range(4):
    netD.zero_grad()
    real_cpu = torch.randn(4, 8)
    b_size = real_cpu.size(0)
    label = torch.full((b_size,), real_label, dtype=torch.float)
    output = netD(real_cpu).view(-1)
    errD_real = criterion(output, label)
    errD_real.backward()
    fake = torch.randn(b_size, 8)
    label.fill_(fake_label)
    output = netD(fake.detach()).view(-1)
    errD_fake = criterion(output, label)
    errD_fake.backward()
    errD = errD_real + errD_fake
    optimizerD.step()
    D_losses.append(errD.item())
'''


def test_two_loss_terms_backwarded_before_one_step_give_their_sum(ip, clean_ns):
    setup(ip, GAN_D)
    rep = gpumem(ip, GAN_D_CELL)
    assert list(rep.losses) == pytest.approx(ip.user_ns["D_losses"], rel=1e-6)


# --- gradient accumulation with GradScaler ------------------------------------------------------
# nanoGPT train.py (the "forward backward update, with optional gradient accumulation" block),
# https://github.com/karpathy/nanoGPT/blob/master/train.py
# Adapted: a tiny bigram model instead of GPT; CPU autocast in bfloat16; a GradScaler on cpu.
NANOGPT = '''
torch.manual_seed(0)
vocab, block_size, batch_size, gradient_accumulation_steps, grad_clip = 32, 8, 4, 4, 1.0
data = torch.randint(0, vocab, (2000,))

class Bigram(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(vocab, vocab)
    def forward(self, idx, targets):
        logits = self.tok(idx)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

def get_batch(split):
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([data[i:i+block_size] for i in ix])
    y = torch.stack([data[i+1:i+1+block_size] for i in ix])
    return x, y

model = Bigram()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
ctx = torch.autocast("cpu", dtype=torch.bfloat16)
micro = []
'''
NANOGPT_CELL = '''
X, Y = get_batch('train')
for iter_num in range(3):
    for micro_step in range(gradient_accumulation_steps):
        with ctx:
            logits, loss = model(X, Y)
            micro.append(loss.item())  # added: each micro-batch's own loss
            loss = loss / gradient_accumulation_steps # scale the loss to account for gradient accumulation
        X, Y = get_batch('train')
        scaler.scale(loss).backward()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
'''


def test_scaled_accumulation_step_loss_is_the_mean_micro_batch_loss(ip, clean_ns):
    setup(ip, NANOGPT)
    rep = gpumem(ip, NANOGPT_CELL)
    m = ip.user_ns["micro"]
    windows = [sum(m[i:i + 4]) / 4 for i in range(0, 12, 4)]
    assert rep.total_steps == 3
    assert list(rep.losses) == pytest.approx(windows, rel=1e-3)  # bfloat16 division rounds
    assert not any(s.partial_window for s in rep.steps)


# --- a last accumulation window shorter than k ---------------------------------------------------
# PyTorch Lightning, Trainer(accumulate_grad_batches=k): the loss is divided by k and the last,
# shorter window of an epoch is stepped as it is (LitAutoEncoder from Lightning's README,
# https://github.com/Lightning-AI/pytorch-lightning#pytorch-lightning-train-and-deploy-pytorch-at-scale).
# Adapted: 10 random 28x28 images in batches of 1; accumulate_grad_batches=4, so windows 4, 4, 2.
LIGHTNING = '''
import lightning as L
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)

class LitAutoEncoder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(28 * 28, 16), nn.ReLU(), nn.Linear(16, 3))
        self.decoder = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 28 * 28))
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x.view(x.size(0), -1)
        z = self.encoder(x)
        x_hat = self.decoder(z)
        loss = F.mse_loss(x_hat, x)
        self.seen.append(loss.item())  # added: each batch's loss
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

train_loader = DataLoader(TensorDataset(torch.rand(10, 1, 28, 28), torch.zeros(10)), batch_size=1)
autoencoder = LitAutoEncoder()
trainer = L.Trainer(max_epochs=1, accumulate_grad_batches=4, accelerator="cpu", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
'''


@pytest.mark.filterwarnings("ignore")  # Lightning's own advice and deprecations are not under test
def test_a_last_shorter_accumulation_window_is_its_sum_and_marked_partial(ip, clean_ns):
    setup(ip, LIGHTNING)
    rep = gpumem(ip, "trainer.fit(model=autoencoder, train_dataloaders=train_loader)")
    seen = ip.user_ns["autoencoder"].seen
    assert len(seen) == 10
    expected = [sum(seen[0:4]) / 4, sum(seen[4:8]) / 4, sum(seen[8:10]) / 4]  # what each update applied
    assert list(rep.losses) == pytest.approx(expected, rel=1e-5)
    assert [s.partial_window for s in rep.steps] == [False, False, True]


PLAIN_ACC = '''
torch.manual_seed(0)
model = nn.Linear(6, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
xs, ys = torch.randn(13, 4, 6), torch.randint(0, 2, (13, 4))
k = 5
micro = []
'''


def test_a_flushed_last_window_of_three_of_five_is_three_fifths_of_its_mean(ip, clean_ns):
    setup(ip, PLAIN_ACC)
    rep = gpumem(ip, """
for i in range(13):
    loss = F.cross_entropy(model(xs[i]), ys[i])
    micro.append(loss.item())
    (loss / k).backward()
    if (i + 1) % k == 0 or i == 12:
        opt.step(); opt.zero_grad()
""")
    m = ip.user_ns["micro"]
    assert list(rep.losses) == pytest.approx([sum(m[0:5]) / 5, sum(m[5:10]) / 5, sum(m[10:13]) / 5], rel=1e-6)
    assert [s.partial_window for s in rep.steps] == [False, False, True]


def test_a_loss_divided_by_its_batch_size_is_no_accumulation_window(ip, clean_ns):
    setup(ip, PLAIN_ACC)
    rep = gpumem(ip, """
for i in range(3):
    loss = F.cross_entropy(model(xs[i]), ys[i], reduction="sum") / xs[i].size(0)
    micro.append(loss.item())
    opt.zero_grad(); loss.backward(); opt.step()
""")
    assert list(rep.losses) == pytest.approx(ip.user_ns["micro"], rel=1e-6)
    assert not any(s.partial_window for s in rep.steps)


def test_one_optimizer_stepping_without_backward_is_a_step_each_time(ip, clean_ns):
    # torch.autograd.grad instead of backward(): no backward() is seen, and every step is its own
    setup(ip, PLAIN_ACC)
    rep = gpumem(ip, """
for i in range(4):
    loss = F.cross_entropy(model(xs[i]), ys[i])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    opt.step()
""")
    assert rep.total_steps == 4
