"""Plain values: numbers, strings and None, which hold no tensors and never need a copy."""

from __future__ import annotations

PLAIN = (int, float, complex, str, bytes, bool, type(None))
