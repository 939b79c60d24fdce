"""The renderer registry: results ask it for their rich views; renderers register for result types.

Results (:mod:`gpumagic.report`) know nothing of renderers. A renderer is a function from a
result to extra mimebundle entries (a PNG, a widget view); it registers for a type with
:func:`register`. Renderer modules are named with :func:`add_module` and imported on the first
render only, so importing gpumagic stays cheap (the package face names :mod:`gpumagic.render.widgets`).

>>> register(MyResult, lambda r: {"image/svg+xml": draw(r)})   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Container
from typing import Any

__all__ = ["Renderer", "add_module", "mimebundle", "register", "renderers_for"]

Renderer = Callable[[Any], dict[str, Any]]
"""Extra mimebundle entries for one result; may raise ImportError when an optional package is missing."""

_RENDERERS: dict[type, list[Renderer]] = {}
_PENDING: list[str] = []
_PROBLEMS: dict[str, str] = {}


def register(cls: type, renderer: Renderer) -> None:
    """Render instances of ``cls`` (and its subclasses) with ``renderer`` too; registering twice is a no-op."""
    found = _RENDERERS.setdefault(cls, [])
    if renderer not in found:
        found.append(renderer)


def add_module(name: str) -> None:
    """Import module ``name`` on the first render: it registers its renderers when imported."""
    if name not in _PENDING:
        _PENDING.append(name)


def _load_pending() -> None:
    while _PENDING:
        name = _PENDING.pop(0)
        try:
            importlib.import_module(name)
        except ImportError as e:  # a broken or partial install: the text views still show
            _PROBLEMS[name] = f"{type(e).__name__}: {e}"


def renderers_for(obj: object) -> list[Renderer]:
    """The renderers registered for ``obj``'s type and its bases, most specific first."""
    _load_pending()
    return [r for cls in type(obj).__mro__ for r in _RENDERERS.get(cls, ())]


def mimebundle(
    obj: Any, include: Container[str] | None = None, exclude: Container[str] | None = None
) -> dict[str, Any]:
    """text/plain and text/html from the object itself, plus what its renderers add; then
    ``include``/``exclude`` applied (also when no renderer could run). A renderer that fails
    adds nothing: the result still shows as text and HTML."""
    bundle: dict[str, Any] = {"text/plain": repr(obj), "text/html": obj._repr_html_()}
    for renderer in renderers_for(obj):
        try:
            bundle.update(renderer(obj))
        except Exception:  # rendering must never hide the result
            continue
    if include:
        bundle = {k: v for k, v in bundle.items() if k in include}
    if exclude:
        bundle = {k: v for k, v in bundle.items() if k not in exclude}
    return bundle
