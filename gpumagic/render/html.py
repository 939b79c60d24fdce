"""Small HTML tables for result objects (no third-party imports)."""

from __future__ import annotations

from collections.abc import Iterable
from html import escape

__all__ = ["html_table"]

_STYLE = (
    "border-collapse:collapse;font-family:var(--jp-code-font-family,monospace);font-size:12px;"
    "margin:4px 0"
)


def html_table(title: str, rows: Iterable[tuple[str, str]], *, kind: str = "report") -> str:
    """A two-column key/value table with a caption; every value is escaped."""
    body = "".join(
        f'<tr><th style="text-align:left;padding:1px 10px 1px 0;font-weight:600;vertical-align:top">'
        f'{escape(k)}</th><td style="text-align:left;padding:1px 0;white-space:pre-wrap">{escape(v)}</td></tr>'
        for k, v in rows
    )
    return (
        f'<table class="gpumagic-{escape(kind)}" style="{_STYLE}">'
        f'<caption style="text-align:left;font-weight:600;padding-bottom:2px">{escape(title)}</caption>'
        f"{body}</table>"
    )
