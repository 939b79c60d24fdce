"""Reading an exception for a message, even when its own ``__str__`` fails."""

from __future__ import annotations

__all__ = ["describe", "safe_str"]


def safe_str(e: BaseException) -> str:
    """``str(e)``, or "" when the exception's ``__str__`` raises (a user's class may do that)."""
    try:
        return str(e)
    except Exception:
        return ""


def describe(e: BaseException) -> str:
    """"TypeError: the first line of its message" (just the type when there is no message)."""
    lines = safe_str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
