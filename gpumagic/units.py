"""Byte counts: formatting for people, parsing what people type.

All of gpumagic keeps memory as ``int`` bytes; only the edges format. ``parse_size`` accepts
IEC units as binary (``"1.5GiB"``) and SI units as decimal (``"800MB"``), as storage vendors
and PyTorch's ``format_size`` do.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

__all__ = [
    "IEC_UNITS", "format_bytes", "format_count", "format_number", "format_percent", "format_seconds",
    "format_size_torch", "parse_size", "unit_bytes",
]

_PREFIXES = "kmgtpe"
IEC_UNITS: tuple[tuple[str, int], ...] = (("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30), ("TiB", 2**40))
"""The binary units gpumagic writes sizes in, smallest first (``reversed`` for largest first)."""
MAX_SIZE = 2**63 - 1
"""The largest size accepted: torch counts bytes in 64-bit signed integers."""
_SIZE_RE = re.compile(r"^\s*([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*([a-zA-Z]*)\s*$")
_ALLOWED = "B, KiB, MiB, GiB, TiB (binary) or kB, MB, GB, TB (decimal)"


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


def _bits(unit: str) -> bool:
    """A unit that ends in a lower-case ``b`` (``Mb``, ``Gib``, ``b``) counts bits, not bytes."""
    return unit.endswith("b") and unit.lower() not in ("byte", "bytes")


def parse_size(value: str | int, *, name: str = "size") -> int:
    """Turn ``"1.5GiB"``, ``"800MB"``, ``"1024"`` or an int into bytes.

    A size is a whole number of bytes: a byte count (no unit, or ``B``) must be an integer, and a
    size in a larger unit is rounded down to whole bytes (``"1.3MiB"`` is 1363148); the result must
    be at least one byte. The arithmetic is exact (no float rounding). Units that count bits
    (``"5Mb"``) are refused, as are negative sizes.

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
    if m is not None and _bits(m.group(4)):
        unit = m.group(4)
        prefix = unit[:-1]
        bytes_unit = (prefix if prefix in ("", "k") else prefix[0].upper() + prefix[1:]) + "B"
        raise ValueError(
            f"{name}: {unit!r} counts bits, not bytes; write {bytes_unit!r} for bytes, got {value!r}"
        )
    scale = unit_bytes(m.group(4)) if m else None
    if m is None or scale is None:
        raise ValueError(f"{name} must be a number with a unit ({_ALLOWED}), got {value!r}")
    if m.group(1) == "-":
        raise ValueError(f"{name} must be > 0 bytes, got {value!r}")
    exponent = int(m.group(3)) if m.group(3) else 0
    number = Fraction(m.group(2))
    if number and exponent > 30:  # 1e30 bytes is already far past any device; keeps the power small
        raise ValueError(f"{name} must be between 1 byte and 8 EiB (2**63 - 1 bytes), got {value!r}")
    exact = number * scale * Fraction(10) ** max(exponent, -400)
    if scale == 1 and exact.denominator != 1:
        raise ValueError(f"{name} must be a whole number of bytes, got {value!r} ({float(exact):g} bytes)")
    result = math.floor(exact)
    if result > MAX_SIZE:
        raise ValueError(f"{name} must be between 1 byte and 8 EiB (2**63 - 1 bytes), got {value!r}")
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
    for unit, scale in IEC_UNITS:
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


def format_percent(fraction: float) -> str:
    """A fraction as a percentage with the digits it has (up to four): a margin of 0.499 is not "50%".

    >>> format_percent(0.05), format_percent(0.499), format_percent(0.95)
    ('5%', '49.9%', '95%')
    """
    return f"{fraction * 100:.4g}%"


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


def format_count(v: float) -> str:
    """A count or size for people: ``1,024`` when whole, three significant digits otherwise (``2.5``)."""
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.3g}"


def format_number(v: float | None) -> str:
    """A measured value (a loss, a noise scale) to four significant digits; ``None``, ``nan`` and
    ``inf`` as Python writes them.

    >>> format_number(0.123456), format_number(None), format_number(float("nan"))
    ('0.1235', 'None', 'nan')
    """
    if v is None or not math.isfinite(v):
        return str(v)
    return f"{v:.4g}"
