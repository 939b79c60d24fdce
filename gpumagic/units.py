"""Byte counts: formatting for people, parsing what people type.

All of gpumagic keeps memory as ``int`` bytes; only the edges format. ``parse_size`` accepts
IEC units as binary (``"1.5GiB"``) and SI units as decimal (``"800MB"``), as storage vendors
and PyTorch's ``format_size`` do.
"""

from __future__ import annotations

import math
import re

__all__ = ["format_bytes", "format_seconds", "format_size_torch", "parse_size", "unit_bytes"]

_PREFIXES = "kmgtpe"
MAX_SIZE = 2**63 - 1
"""The largest size accepted: torch counts bytes in 64-bit signed integers."""
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e([+-]?[0-9]+))?\s*([a-zA-Z]*)\s*$")


def unit_bytes(unit: str, *, si_decimal: bool = True) -> int | None:
    """Bytes in one ``unit`` (any case), or None when it is not a byte unit. The one unit table.

    IEC units ("GiB") are binary. SI units ("GB") are decimal, or binary with ``si_decimal=False``:
    allocator messages mean them so (MPS, XLA), and print a bare prefix ("21.95G") too.

    >>> unit_bytes("MiB"), unit_bytes("MB"), unit_bytes("MB", si_decimal=False), unit_bytes("G")
    (1048576, 1000000, 1048576, None)
    """
    u = unit.lower()
    if u in ("", "b", "byte", "bytes"):
        return 1
    if u[0] not in _PREFIXES:
        return None
    power = _PREFIXES.index(u[0]) + 1
    rest = u[1:]
    if rest == "ib" or (not si_decimal and rest in ("b", "")):
        return int(1024**power)
    return int(1000**power) if rest == "b" else None


def parse_size(value: str | int, *, name: str = "size") -> int:
    """Turn ``"1.5GiB"``, ``"800MB"``, ``"1024"`` or an int into bytes.

    >>> parse_size("1.5GiB")
    1610612736
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a size such as '2GiB', '800MB' or a byte count, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{name} must be > 0 bytes, got {value}")
        if value > MAX_SIZE:
            raise ValueError(f"{name} must be between 1 byte and 8 EiB (2**63 - 1 bytes), got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(
            f"{name} must be a size such as '2GiB', '800MB' or a byte count, got {type(value).__name__} {value!r}"
        )
    m = _SIZE_RE.match(value)
    scale = unit_bytes(m.group(3)) if m else None
    if m is None or scale is None:
        allowed = "B, KiB, MiB, GiB, TiB (binary) or kB, MB, GB, TB (decimal)"
        raise ValueError(f"{name} must be a number with a unit ({allowed}), got {value!r}")
    exponent = int(m.group(2)) if m.group(2) else 0
    number = float(m.group(1)) * scale
    if number and exponent > 30:  # 1e30 bytes is already far past any device: no float overflow below
        number = math.inf
    else:
        number *= 10.0**exponent
    if not math.isfinite(number) or number > MAX_SIZE:
        raise ValueError(f"{name} must be between 1 byte and 8 EiB (2**63 - 1 bytes), got {value!r}")
    result = math.floor(number + 0.5)
    if result <= 0:
        raise ValueError(f"{name} must be > 0 bytes, got {value!r}")
    return result


def format_bytes(n: int | None, *, signed: bool = False) -> str:
    """Format a byte count the way PyTorch's memory messages do (IEC units, two decimals).

    >>> format_bytes(3 * 2**20 // 2)
    '1.50 MiB'
    """
    if n is None:
        return "unknown"
    sign = ""
    if n < 0:
        sign, n = "-", -n
    elif signed:
        sign = "+"
    if n < 1024:
        return f"{sign}{n} B"
    for unit, scale in (("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30), ("TiB", 2**40)):
        if n < scale * 1024 or unit == "TiB":
            return f"{sign}{n / scale:.2f} {unit}"
    raise AssertionError("unreachable")


def format_size_torch(n: int) -> str:
    """Format exactly as PyTorch's allocator messages do (c10 ``format_size``), so the
    simulated OOM reads like a real one and parses back to the same bytes."""
    if n <= 1024:
        return f"{n} bytes"
    if n <= 2**20:
        return f"{n / 2**10:.2f} KiB"
    if n <= 2**30:
        return f"{n / 2**20:.2f} MiB"
    return f"{n / 2**30:.2f} GiB"


def format_seconds(s: float | None) -> str:
    """A duration for a report: '850 µs', '12.5 ms', '3.20 s', '4.5 min'; 'unknown' for None.

    >>> format_seconds(0.0125), format_seconds(270)
    ('12.5 ms', '4.5 min')
    """
    if s is None:
        return "unknown"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.2f} s"
    return f"{s / 60:.1f} min"
