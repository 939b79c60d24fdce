"""Advice for out-of-memory errors: numbers derived from the figures, never invented.

The batch-size tests use a device whose peak is known exactly, peak(b) = fixed + per_sample·b,
and the message gpumagic itself raises when a simulated budget runs out; one test trains a real
torch model on cpu under ``gpumagic.track(budget=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import gpumagic
from gpumagic.backends.cpu_exact import simulated_oom_message
from gpumagic.oom import Advice, AdviceContext, OOMInfo, advise, parse

MiB = 2**20
GiB = 2**30
CORPUS = Path(__file__).resolve().parents[1] / "oom_corpus" / "positive"


def corpus(prefix: str) -> OOMInfo:
    path = next(CORPUS.glob(f"{prefix}_*.txt"))
    info = parse(path.read_text(encoding="utf-8").split("# ---\n", 1)[1])
    assert info is not None
    return info


def pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


@dataclass(frozen=True)
class Device:
    """A device whose training step needs exactly fixed + per_sample·b, allocated layer by layer."""

    fixed: int
    per_sample: int
    capacity: int
    layers: int = 4

    def peak(self, b: int) -> int:
        return self.fixed + self.per_sample * b

    def fits(self, b: int) -> bool:
        return self.peak(b) <= self.capacity

    def true_max(self) -> int:
        return (self.capacity - self.fixed) // self.per_sample

    def oom(self, b: int) -> OOMInfo:
        """The message of the first layer allocation at batch b that does not fit."""
        allocated, chunk = self.fixed, self.per_sample * b // self.layers
        while allocated + chunk <= self.capacity:
            allocated += chunk
        info = parse(simulated_oom_message(chunk, allocated, self.capacity))
        assert info is not None
        return info

    def fit_context(self, **kw: object) -> AdviceContext:
        return AdviceContext(
            bytes_per_sample=float(self.per_sample),
            intercept_bytes=float(self.fixed),
            capacity_bytes=self.capacity,
            **kw,  # type: ignore[arg-type]
        )


DEVICE = Device(fixed=100 * MiB, per_sample=1 * MiB, capacity=800 * MiB)  # true max 700


def first_batch(advice: Advice) -> int:
    batch = next(s for s in advice.suggestions if s.kind == "batch_size")
    assert batch.batch_size is not None
    return batch.batch_size


# --- the batch size that fits ----------------------------------------------------------------------


def test_fit_suggests_the_largest_size_within_the_margin_and_names_the_power_of_two_below() -> None:
    advice = advise(DEVICE.oom(1024), DEVICE.fit_context(batch_size=1024))
    assert advice.suggestions[0].kind == "batch_size"
    assert first_batch(advice) == 660  # 95% of 800 MiB: (760 - 100) / 1
    assert DEVICE.fits(first_batch(advice))
    assert "the power of two below is 512" in advice.suggestions[0].detail


def test_message_alone_gives_a_bound_never_a_size_to_use() -> None:
    advice = advise(DEVICE.oom(1024), AdviceContext(batch_size=1024))
    assert advice.fits_batch_size is None
    first = advice.suggestions[0]
    assert first.kind == "bound"
    assert first.batch_size is None
    assert "At most" in first.title


def test_message_with_a_measuring_command_suggests_measuring_first() -> None:
    code = "%find_batch --var batch_size -d cpu --budget 800MiB"
    advice = advise(DEVICE.oom(1024), AdviceContext(batch_size=1024, baseline_bytes=DEVICE.fixed, measure_code=code))
    first = advice.suggestions[0]
    assert (first.kind, first.code, first.batch_size) == ("measure", code, None)
    assert "at most" in first.detail
    assert advice.fits_batch_size is None


def test_a_lower_bound_close_to_the_upper_bound_is_the_size_to_use() -> None:
    # a run that worked charged everything above the baseline to the batch: 1.05 MiB per sample
    ctx = AdviceContext(batch_size=720, bytes_per_sample=1.05 * MiB, intercept_bytes=float(DEVICE.fixed),
                        capacity_bytes=DEVICE.capacity, fit_source="run", measure_code="%find_batch --var b")
    advice = advise(DEVICE.oom(720), ctx)  # failed in its last layer: at most 660 fit
    first = advice.suggestions[0]
    assert first.kind == "batch_size"
    assert first.batch_size == 628
    assert DEVICE.fits(628)


def test_a_lower_bound_far_below_the_upper_bound_suggests_measuring() -> None:
    ctx = AdviceContext(batch_size=1024, bytes_per_sample=3 * MiB, intercept_bytes=float(DEVICE.fixed),
                        capacity_bytes=DEVICE.capacity, fit_source="run", measure_code="%find_batch --var b")
    first = advise(DEVICE.oom(1024), ctx).suggestions[0]
    assert first.kind == "measure"
    assert "at least 220" in first.detail


@pytest.mark.parametrize(
    "device",
    [
        Device(fixed=2 * GiB, per_sample=3 * MiB, capacity=24 * GiB),
        Device(fixed=300 * MiB, per_sample=40 * MiB, capacity=16 * GiB, layers=12),
        Device(fixed=7 * GiB, per_sample=120 * MiB, capacity=80 * GiB, layers=8),
    ],
    ids=["24GiB", "16GiB", "80GiB"],
)
def test_fit_suggestion_fits_and_is_the_largest_power_of_two(device: Device) -> None:
    b = pow2_floor(device.true_max()) * 4
    advice = advise(device.oom(b), device.fit_context(batch_size=b))
    pick = first_batch(advice)
    assert device.fits(pick)
    assert not device.fits(2 * pick)


def test_step_that_failed_part_way_says_the_size_is_an_upper_bound() -> None:
    first = advise(DEVICE.oom(1024), AdviceContext(batch_size=1024)).suggestions[0]
    assert first.title.startswith("At most ")
    assert first.title.endswith(" samples can fit (now 1024): a bound, not a size known to fit")
    assert first.kind == "bound"
    assert first.batch_size is None  # never a size to use


def test_fixed_part_larger_than_the_device_says_no_batch_fits() -> None:
    small = Device(fixed=790 * MiB, per_sample=1 * MiB, capacity=800 * MiB)
    advice = advise(small.oom(64), small.fit_context(batch_size=64))
    assert advice.suggestions[0].title == "Even batch 1 does not fit"
    assert advice.fits_batch_size is None


def test_real_training_under_a_budget_gets_a_batch_that_fits() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train(b: int, budget: int | None = None) -> int:
        with gpumagic.track(device="cpu", budget=budget) as t:
            for _ in range(2):
                x, y = torch.randn(b, 256), torch.randint(0, 10, (b,))
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
        peak = t.report.peak_bytes
        assert peak is not None
        return peak

    # Peaks are affine in the batch from a few hundred samples up (below, parameters dominate).
    p1, p2 = train(512), train(1024)
    slope = (p2 - p1) / 512
    intercept = p1 - 512 * slope
    budget = int(intercept + 1400 * slope)
    try:
        train(4096, budget)
    except torch.OutOfMemoryError as exc:
        info = parse(exc)
    else:
        pytest.fail("batch 4096 fitted the budget")
    # The exception is gone here, and with it the frames that kept batch-4096 tensors alive.
    assert info is not None
    assert info.simulated
    ctx = AdviceContext(batch_size=4096, bytes_per_sample=slope, intercept_bytes=intercept, capacity_bytes=budget)
    pick = first_batch(advise(info, ctx))
    assert 1024 < pick < 1400
    train(pick, budget)  # fits
    with pytest.raises(torch.OutOfMemoryError):
        train(2 * pick, budget)


# --- gradient accumulation and the learning rate --------------------------------------------------


def test_accumulation_keeps_the_effective_batch_and_the_learning_rate() -> None:
    advice = advise(DEVICE.oom(1024), DEVICE.fit_context(batch_size=1024, optimizer="AdamW"))
    acc = next(s for s in advice.suggestions if s.kind == "accumulation")
    assert (acc.batch_size, acc.accumulation_steps) == (512, 2)
    assert "keep the learning rate: the effective batch stays 1024" in acc.detail
    assert acc.code is not None
    assert "/ 2" in acc.code


def test_accumulation_counts_the_steps_already_used() -> None:
    device = Device(fixed=100 * MiB, per_sample=4 * MiB, capacity=800 * MiB)  # fits 165 -> 128
    advice = advise(device.oom(256), device.fit_context(batch_size=256, accumulation_steps=4))
    acc = next(s for s in advice.suggestions if s.kind == "accumulation")
    assert acc.batch_size is not None
    assert acc.accumulation_steps is not None
    assert device.fits(acc.batch_size)
    assert acc.batch_size * acc.accumulation_steps >= 1024


@pytest.mark.parametrize("optimizer", ["AdamW", "SGD"])
def test_accumulation_padded_by_a_sample_keeps_the_learning_rate(optimizer: str) -> None:
    device = Device(fixed=100 * MiB, per_sample=1 * MiB, capacity=580 * MiB)  # 95%: fits 451
    advice = advise(device.oom(1001), device.fit_context(batch_size=1001, optimizer=optimizer))
    acc = next(s for s in advice.suggestions if s.kind == "accumulation")
    assert (acc.batch_size, acc.accumulation_steps) == (334, 3)  # 1002 samples for 1001
    assert "keep the learning rate: the effective batch goes from 1001 to 1002" in acc.detail
    assert "multiply" not in acc.detail


@pytest.mark.parametrize(("optimizer", "rule"), [("AdamW", "square-root scaling"), ("SGD", "linear scaling")])
def test_padded_accumulation_says_how_to_scale_the_learning_rate(optimizer: str, rule: str) -> None:
    device = Device(fixed=100 * MiB, per_sample=1 * MiB, capacity=120 * MiB)  # 95%: fits 14
    advice = advise(device.oom(29), device.fit_context(batch_size=29, optimizer=optimizer))
    acc = next(s for s in advice.suggestions if s.kind == "accumulation")
    assert (acc.batch_size, acc.accumulation_steps) == (10, 3)  # 30 samples for 29
    assert "29 → 30: multiply the learning rate by" in acc.detail
    assert rule in acc.detail


def test_no_accumulation_when_the_batch_already_fits() -> None:
    advice = advise(DEVICE.oom(1024), DEVICE.fit_context(batch_size=256))
    assert all(s.kind != "accumulation" for s in advice.suggestions)


# --- what could not be derived --------------------------------------------------------------------


def test_unknown_batch_size_is_reported_and_no_size_is_invented() -> None:
    advice = advise(DEVICE.oom(1024))
    assert advice.fits_batch_size is None
    assert any("batch size in use" in u for u in advice.unknown)
    batch = next(s for s in advice.suggestions if s.kind == "batch_size")
    assert batch.batch_size is None
    assert batch.title == "Use a smaller batch size"


def test_error_without_figures_reports_what_is_missing() -> None:
    info = parse("torch.AcceleratorError: CUDA error: out of memory")
    advice = advise(info, AdviceContext(batch_size=64))
    assert advice.fits_batch_size is None
    assert advice.headline == "Out of memory on cuda (the error states no figures)."
    assert any("how much the failing step needed" in u for u in advice.unknown)
    assert any("how much memory is usable" in u for u in advice.unknown)
    assert all(s.batch_size is None for s in advice.suggestions)


def test_cuda_error_points_at_what_fills_the_gpu() -> None:
    advice = advise(parse("RuntimeError: CUDA error: out of memory"))
    assert advice.suggestions[0].kind == "cuda_error"
    assert advice.suggestions[0].code is not None
    assert "nvidia-smi" in advice.suggestions[0].code


def test_cudnn_alloc_failure_suggests_turning_off_benchmark() -> None:
    advice = advise(parse("RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    code = advice.suggestions[0].code
    assert code is not None
    assert "torch.backends.cudnn.benchmark = False" in code


def test_fit_without_capacity_reports_the_capacity_unknown() -> None:
    advice = advise(None, AdviceContext(batch_size=64, bytes_per_sample=1e6, intercept_bytes=1e8))
    assert any("capacity" in u for u in advice.unknown)
    assert advice.fits_batch_size is None


def test_no_information_at_all_still_gives_a_headline() -> None:
    advice = advise(None)
    assert advice.headline == "Out of memory (the error states no figures)."
    assert advice.fits_batch_size is None


def test_unknown_fixed_part_is_reported() -> None:
    advice = advise(DEVICE.oom(1024), AdviceContext(batch_size=1024))
    assert any("does not grow with the batch" in u for u in advice.unknown)


def test_unknown_activation_size_is_reported() -> None:
    advice = advise(DEVICE.oom(1024), AdviceContext(batch_size=1024))
    mixed = next(s for s in advice.suggestions if s.kind == "mixed_precision")
    assert "unknown" in mixed.detail
    assert any("activations" in u for u in advice.unknown)


def test_known_activation_size_gives_the_autocast_saving() -> None:
    advice = advise(DEVICE.oom(1024), AdviceContext(batch_size=1024, activation_bytes=2 * GiB))
    mixed = next(s for s in advice.suggestions if s.kind == "mixed_precision")
    check = next(s for s in advice.suggestions if s.kind == "checkpointing")
    assert "about 1.00 GiB" in mixed.detail
    assert "2.00 GiB of activations" in check.detail
    assert "30% more compute" in check.detail
    assert not any("activations" in u for u in advice.unknown)


def test_mixed_precision_is_not_suggested_when_already_used() -> None:
    advice = advise(DEVICE.oom(1024), AdviceContext(batch_size=1024, mixed_precision=True))
    assert all(s.kind != "mixed_precision" for s in advice.suggestions)


# --- causes other than the batch ------------------------------------------------------------------


def test_fragmentation_larger_than_the_request_ranks_first() -> None:
    advice = advise(corpus("031"))  # 4.84 GiB reserved but unallocated, 3.00 GiB requested
    top = advice.suggestions[0]
    assert top.kind == "fragmentation"
    assert "4.84 GiB" in top.detail
    assert top.code is not None
    assert 'os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"' in top.code


def test_fragmentation_on_rocm_names_the_hip_variable() -> None:
    advice = advise(corpus("041"))  # HIP, 7.10 GiB reserved but unallocated
    frag = next(s for s in advice.suggestions if s.kind == "fragmentation")
    assert frag.code is not None
    assert "PYTORCH_HIP_ALLOC_CONF" in frag.code


def test_little_unallocated_memory_is_not_fragmentation() -> None:
    advice = advise(corpus("028"))  # 194.87 MiB of 23.09 GiB reserved
    assert all(s.kind != "fragmentation" for s in advice.suggestions)


def test_processes_named_in_the_message_are_listed() -> None:
    advice = advise(corpus("034"))  # fifteen DDP workers with 1.19 GiB each
    procs = next(s for s in advice.suggestions if s.kind == "other_processes")
    assert procs.title == "Other processes hold 17.85 GiB"
    assert "101553: 1.19 GiB" in procs.detail
    assert "and 10 more" in procs.detail


def test_processes_from_nvml_are_named_and_rank_first_when_they_cover_the_shortfall() -> None:
    ctx = AdviceContext(processes=((4242, 6 * GiB, "python3"), (77, 512 * MiB, None)))
    advice = advise(corpus("028"), ctx)
    top = advice.suggestions[0]
    assert top.kind == "other_processes"
    assert "4242 (python3): 6.00 GiB" in top.detail


def test_container_pid_holding_pytorchs_memory_is_this_process() -> None:
    advice = advise(corpus("030"))  # "Process 20398 has 14.52 GiB", PyTorch allocated 14.06 GiB
    assert all(s.kind != "other_processes" for s in advice.suggestions)


def test_memory_outside_pytorch_is_shown_for_the_async_backend() -> None:
    advice = advise(corpus("050"))  # 23.69 GiB total, 2.94 MiB free, 6.89 GiB allocated
    gap = next(s for s in advice.suggestions if s.kind == "other_processes")
    assert gap.title == "16.80 GiB is in use elsewhere"
    assert "cudaMallocAsync pool" in gap.detail


def test_memory_fraction_limit_ranks_first_with_its_call() -> None:
    advice = advise(corpus("045"), AdviceContext(batch_size=8))  # XPU, 8.27 GiB allowed of 16.54 GiB
    top = advice.suggestions[0]
    assert top.kind == "limit"
    assert top.title == "Raise the memory fraction (0.50 now)"
    assert top.code == "torch.xpu.set_per_process_memory_fraction(1.0)"


def test_mps_limit_names_the_watermark_variable() -> None:
    advice = advise(corpus("055"))  # 9.57 GiB + 17.35 GiB + 292.50 MiB over 27.20 GiB
    limit = next(s for s in advice.suggestions if s.kind == "limit")
    assert "PYTORCH_MPS_HIGH_WATERMARK_RATIO" in limit.detail
    assert "just over it" in limit.detail


def test_mps_limit_reached_within_rounding_says_at_the_limit() -> None:
    advice = advise(corpus("064"))  # 18.02 GB + 107.10 MB + 4.50 MB prints as the 18.13 GB limit
    limit = next(s for s in advice.suggestions if s.kind == "limit")
    assert "needed 18.13 GiB, at the limit" in limit.detail


def test_holders_that_cover_the_shortfall_rank_first_with_code_to_free_them() -> None:
    ctx = AdviceContext(batch_size=1024, holders=(("old_model", 300 * MiB), ("cache", 20 * MiB)))
    advice = advise(DEVICE.oom(1024), ctx)
    top = advice.suggestions[0]
    assert top.kind == "holders"
    assert top.title == "Free memory held by notebook variables this cell does not use (320.00 MiB)"
    assert top.code is not None
    assert top.code.splitlines()[:2] == ["del old_model, cache  # keep what you still need", "import gc; gc.collect()"]


def test_holders_on_cuda_also_empty_the_cache() -> None:
    advice = advise(corpus("028"), AdviceContext(holders=(("embeddings", 3 * GiB),)))
    holders = next(s for s in advice.suggestions if s.kind == "holders")
    assert holders.code is not None
    assert "torch.cuda.empty_cache()" in holders.code


def test_baseline_without_names_points_at_gpumem_free() -> None:
    advice = advise(DEVICE.oom(1024), AdviceContext(batch_size=1024, baseline_bytes=100 * MiB))
    holders = next(s for s in advice.suggestions if s.kind == "holders")
    assert holders.code == "%gpumem --free"


def test_host_memory_error_gets_host_advice_not_autocast() -> None:
    advice = advise(corpus("067"))  # DefaultCPUAllocator, 1178729664 bytes
    kinds = [s.kind for s in advice.suggestions]
    assert "host_memory" in kinds
    assert "mixed_precision" not in kinds
    assert advice.headline == "Out of host memory (RAM): tried to allocate 1.10 GiB."


def test_jax_error_gets_no_torch_code() -> None:
    advice = advise(corpus("089"), AdviceContext(batch_size=32))  # XLA:TPU compile, 21.95G of 15.48G
    assert advice.fits_batch_size == 21  # the figures state the whole need: 32 x 95% of 15.48G / 21.95G
    assert all(s.code is None for s in advice.suggestions)


# --- the result object ----------------------------------------------------------------------------


def test_headline_states_the_figures() -> None:
    info = parse(
        "CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 23.65 GiB of which "
        "820.00 MiB is free."
    )
    assert (
        advise(info).headline
        == "Out of memory on cuda:0: tried to allocate 1.50 GiB with 820.00 MiB free of 23.65 GiB."
    )


def test_simulated_headline_names_the_budget() -> None:
    advice = advise(DEVICE.oom(1024))
    assert advice.headline == (
        "Out of memory on the simulated cpu device (budget 800.00 MiB): tried to allocate 256.00 MiB with "
        "188.00 MiB free."
    )


def test_text_is_compact_and_is_str() -> None:
    advice = advise(DEVICE.oom(1024), AdviceContext(batch_size=1024, holders=(("x", MiB),)))
    text = advice.text()
    assert text.splitlines()[0] == advice.headline
    assert len(text.splitlines()) <= 20
    assert str(advice) == text
    assert "\n" not in repr(advice)


def test_html_escapes_every_field() -> None:
    ctx = AdviceContext(batch_size=1024, holders=(("<img src=x onerror=alert(1)>", 300 * MiB),))
    html = advise(DEVICE.oom(1024), ctx)._repr_html_()
    assert "<img" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert html.count("<li>") == len(advise(DEVICE.oom(1024), ctx).suggestions)


def test_advice_is_frozen() -> None:
    advice = advise(None)
    with pytest.raises(AttributeError):
        advice.headline = "x"  # type: ignore[misc]
