"""%%batch_sweep on a loop nobody here wrote: the PyTorch tutorial "Optimizing Model Parameters"
(https://pytorch.org/tutorials/beginner/basics/optimization_tutorial.html), its train_loop and
test_loop as published, adapted to run offline on the CPU: random 28x28 images stand in for
FashionMNIST, a smaller hidden layer, and test_loop returns the accuracy it prints (the
tutorial's prints it only)."""

from __future__ import annotations

import pytest
from IPython.utils.capture import capture_output

TUTORIAL = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
images = torch.rand(1280, 1, 28, 28)
targets = (images.flatten(1) @ torch.randn(784, 10)).argmax(1)
training_data = TensorDataset(images[:1024], targets[:1024])
test_data = TensorDataset(images[1024:], targets[1024:])


class NeuralNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28*28, 64),
            nn.ReLU(),
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x):
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits


model = NeuralNetwork()
learning_rate = 1e-3
batch_size = 64
loss_fn = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)


def train_loop(dataloader, model, loss_fn, optimizer):
    size = len(dataloader.dataset)
    # Set the model to training mode - important for batch normalization and dropout layers
    # Unnecessary in this situation but added for best practices
    model.train()
    for batch, (X, y) in enumerate(dataloader):
        # Compute prediction and loss
        pred = model(X)
        loss = loss_fn(pred, y)

        # Backpropagation
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

        if batch % 100 == 0:
            loss, current = loss.item(), batch * batch_size + len(X)
            print(f"loss: {loss:>7f}  [{current:>5d}/{size:>5d}]")


def test_loop(dataloader, model, loss_fn):
    # Set the model to evaluation mode - important for batch normalization and dropout layers
    # Unnecessary in this situation but added for best practices
    model.eval()
    size = len(dataloader.dataset)
    num_batches = len(dataloader)
    test_loss, correct = 0, 0

    # Evaluating the model with torch.no_grad() ensures that no gradients are computed during test mode
    # also serves to reduce unnecessary gradient computation for tensors with requires_grad=True
    with torch.no_grad():
        for X, y in dataloader:
            pred = model(X)
            test_loss += loss_fn(pred, y).item()
            correct += (pred.argmax(1) == y).type(torch.float).sum().item()

    test_loss /= num_batches
    correct /= size
    print(f"Test Error: \\n Accuracy: {(100*correct):>0.1f}%, Avg loss: {test_loss:>8f} \\n")
    return correct


test_dataloader = DataLoader(test_data, batch_size=64)
'''

CELL = '''
train_dataloader = DataLoader(training_data, batch_size=batch_size, shuffle=True)
train_loop(train_dataloader, model, loss_fn, optimizer)
'''


@pytest.mark.slow
def test_the_optimization_tutorial_is_swept_with_its_test_loop_as_validation(ip, clean_ns):
    ip.run_cell(TUTORIAL).raise_error()
    ip.run_cell("import copy; w0 = copy.deepcopy(model.state_dict()); rng0 = torch.get_rng_state()").raise_error()
    with capture_output():
        r = ip.run_cell('%%batch_sweep --var batch_size --sizes 16,64,256 --val "test_loop(test_dataloader, model, '
                        'loss_fn)" --val-name accuracy -o\n' + CELL)
    r.raise_error()
    res = r.result
    assert [run.total_samples for run in res.runs] == [1024, 1024, 1024]  # one pass over its data set
    assert [run.lrs for run in res.runs] == [(pytest.approx(2.5e-4),), (pytest.approx(1e-3),), (pytest.approx(4e-3),)]
    assert all(run.val is not None and 0 <= run.val <= 1 for run in res.runs)
    assert res.noise_scale is not None
    assert res.recommended in (16, 64, 256)
    assert "accuracy" in res.why
    ns = ip.user_ns
    assert all(ns["torch"].equal(v, ns["model"].state_dict()[k]) for k, v in ns["w0"].items())
    assert ns["torch"].equal(ns["torch"].get_rng_state(), ns["rng0"])
    assert ns["optimizer"].param_groups[0]["lr"] == 1e-3
    assert ns["batch_size"] == 64
    assert "train_dataloader" not in ns
