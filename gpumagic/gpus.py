"""A catalog of common GPUs, for planning memory on a GPU you do not have (``--gpu T4``).

``total_bytes`` is the device total as PyTorch reports it (``get_device_properties().total_memory``,
the figure printed in CUDA out-of-memory messages as "total capacity"); it is smaller than the
marketing size. ``capacity_bytes`` is what one training process can allocate: the total minus
the CUDA context (driver, cuBLAS/cuDNN kernels loaded on first use), which never shows in
``memory_allocated`` but occupies the device. The context figures are estimates for CUDA 12
with lazy module loading (torch's default since 2.0): about 300 MiB before Hopper, about 500 MiB
on Hopper; they vary with the driver, the CUDA version and the libraries a program touches.

>>> lookup("t4").name
'T4'
"""

from __future__ import annotations

from dataclasses import dataclass

from gpumagic.options import BadOptions

__all__ = ["GPU", "GPUS", "lookup"]

_GiB = 2**30
_MiB = 2**20


@dataclass(frozen=True)
class GPU:
    """One GPU model: memory figures in bytes, compute capability, and where the total comes from."""

    name: str
    total_bytes: int
    context_bytes: int
    compute_capability: tuple[int, int]
    source: str

    @property
    def capacity_bytes(self) -> int:
        """Memory a training process can allocate: the total minus the CUDA context."""
        return self.total_bytes - self.context_bytes

    @property
    def bf16(self) -> bool:
        """Whether the GPU computes in bfloat16 natively (Ampere, sm 8.0, and later)."""
        return self.compute_capability >= (8, 0)

    @property
    def flash_attention(self) -> bool:
        """Whether PyTorch's flash-attention kernel runs on it (sm 8.0 and later, fp16/bf16)."""
        return self.compute_capability >= (8, 0)


def _gib(x: float) -> int:
    return round(x * _GiB)


_OOM = "torch's total_memory, as printed in public CUDA OOM messages ('{} GiB total capacity')"
_SMI = "nvidia-smi's memory total on this GPU ({} MiB), which is what cudaMemGetInfo reports"

GPUS: dict[str, GPU] = {
    g.name.lower(): g
    for g in (
        GPU("T4", 15_837_691_904, 300 * _MiB, (7, 5),
            "torch total_memory 15837691904 (14.75 GiB), from a Colab OOM message in tests/oom_corpus"),
        GPU("L4", _gib(22.17), 300 * _MiB, (8, 9), _OOM.format("22.17")),
        GPU("A10G", _gib(22.20), 300 * _MiB, (8, 6), _OOM.format("22.20")),
        GPU("V100-16GB", _gib(15.78), 300 * _MiB, (7, 0), _OOM.format("15.78")),
        GPU("V100-32GB", _gib(31.75), 300 * _MiB, (7, 0), _OOM.format("31.75")),
        GPU("A100-40GB", _gib(39.59), 300 * _MiB, (8, 0), _OOM.format("39.59")),
        GPU("A100-80GB", _gib(79.15), 300 * _MiB, (8, 0), _OOM.format("79.15")),
        GPU("H100-80GB", _gib(79.11), 500 * _MiB, (9, 0), _OOM.format("79.11")),
        GPU("H200", 143_771 * _MiB, 500 * _MiB, (9, 0), _SMI.format("143771")),
        GPU("RTX-3090", _gib(23.69), 300 * _MiB, (8, 6), _OOM.format("23.69")),
        GPU("RTX-4090", 25_393_994_138, 300 * _MiB, (8, 9),
            "torch total_memory 25393994138 (23.65 GiB), from an OOM message in tests/oom_corpus"),
    )
}


def lookup(name: str) -> GPU:
    """The catalog entry for ``name``, case-insensitive ("rtx 4090", "RTX-4090" and "nvidia-t4" work);
    a BadOptions (a ValueError) listing the known names otherwise."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    gpu = GPUS.get(key) or GPUS.get(key.removeprefix("nvidia-"))
    if gpu is None:
        known = ", ".join(g.name for g in GPUS.values())
        raise BadOptions(f"unknown GPU {name!r}; known GPUs: {known}")
    return gpu
