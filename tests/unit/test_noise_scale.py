"""The simple noise scale (McCandlish et al. 2018, appendix A) against its exact value.

The exact value comes from every sample's own gradient (``torch.func.vmap(grad(...))``) at the
starting weights: ``B = tr(Σ) / |G|²`` with ``G`` their mean and ``Σ`` their covariance. The
sweep estimates it from the loop itself, with the default number of measurements.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

import gpumagic
from gpumagic.noise import estimate


def exact_noise_scale(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> float:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in per.values()], dim=1).double()
    mean = flat.mean(0)
    trace = (flat - mean).pow(2).sum(1).mean()
    return float(trace / mean.pow(2).sum())


def problem(kind: str):
    torch.manual_seed(1)
    n = 4096
    x = torch.randn(n, 16)
    if kind == "regression, little noise":
        model = nn.Linear(16, 1)
        y = x @ torch.randn(16, 1) + 0.1 * torch.randn(n, 1)
        return model, x, y, F.mse_loss
    if kind == "regression, much noise":
        model = nn.Linear(16, 1)
        y = x @ torch.randn(16, 1) * 0.15 + 3.0 * torch.randn(n, 1)
        return model, x, y, F.mse_loss
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    y = (x @ torch.randn(16, 4)).argmax(1)
    return model, x, y, F.cross_entropy


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["regression, little noise", "regression, much noise", "classification MLP"])
def test_noise_scale_is_within_a_quarter_of_the_exact_value(kind: str) -> None:
    model, x, y, loss_fn = problem(kind)
    exact = exact_noise_scale(model, x, y, loss_fn)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = TensorDataset(x, y)

    def train(b: int) -> None:
        for xb, yb in DataLoader(data, batch_size=b, shuffle=True):
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()

    res = gpumagic.batch_sweep(train, sizes=[16, 256], samples=512, device="cpu", restore=[model, opt])
    assert res.noise_scale is not None, res.noise_scale_why
    assert abs(res.noise_scale.value / exact - 1) < 0.25, (res.noise_scale.value, exact)
    assert res.noise_scale.low <= res.noise_scale.value <= res.noise_scale.high


def test_the_three_problems_differ_in_noise() -> None:
    values = sorted(exact_noise_scale(*problem(k)) for k in
                    ("regression, little noise", "regression, much noise", "classification MLP"))
    assert values[1] > 1.5 * values[0], values
    assert values[2] > 5 * values[1], values


@pytest.mark.slow
def test_a_summed_loss_is_divided_by_the_batch_size() -> None:
    model, x, y, _ = problem("regression, much noise")

    def summed(out, target):
        return F.mse_loss(out, target, reduction="sum")

    exact = exact_noise_scale(model, x, y, F.mse_loss)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    data = TensorDataset(x, y)

    def train(b: int) -> None:
        for xb, yb in DataLoader(data, batch_size=b, shuffle=True):
            loss = summed(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()

    res = gpumagic.batch_sweep(train, sizes=[16, 256], samples=256, device="cpu", restore=[model, opt])
    assert res.noise_scale is not None
    assert res.noise_scale.normalised
    assert abs(res.noise_scale.value / exact - 1) < 0.25, (res.noise_scale.value, exact)


def test_the_noise_scale_says_why_it_is_missing_with_one_size() -> None:
    assert "two or more batch sizes" in estimate([(16, 1.0), (16, 1.2)])


def test_the_noise_scale_says_why_it_is_missing_without_an_optimizer() -> None:
    model, x, y, loss_fn = problem("classification MLP")

    def evaluate_only(b: int) -> None:
        for xb, yb in DataLoader(TensorDataset(x, y), batch_size=b):
            loss_fn(model(xb), yb).backward()

    res = gpumagic.batch_sweep(evaluate_only, sizes=[16, 64], samples=64, device="cpu", restore=[model])
    assert res.noise_scale is None
    assert "no optimizer step read a gradient" in res.noise_scale_why


def test_an_optimizer_that_moves_weights_without_gradients_gives_no_noise_scale() -> None:
    model, x, y, loss_fn = problem("classification MLP")

    class DecayEverything(torch.optim.Optimizer):
        def __init__(self, params) -> None:
            super().__init__(params, {"lr": 0.01})

        @torch.no_grad()
        def step(self, closure=None) -> None:
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_(0.99)
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])

    opt = DecayEverything(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]

    def train(b: int) -> None:
        for xb, yb in DataLoader(TensorDataset(x, y), batch_size=b, shuffle=True):
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()

    res = gpumagic.batch_sweep(train, sizes=[16, 64], samples=64, noise_batches=3, device="cpu",
                               restore=[model, opt])
    assert res.noise_scale is None
    assert "changed the weights without gradients" in res.noise_scale_why
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
