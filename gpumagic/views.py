"""The renderer registry: results ask it for their views; renderers register with it.

Results (:mod:`gpumagic.report`) know nothing of renderers: their ``_repr_pretty_``,
``_repr_html_`` and ``to_text`` ask :func:`view` here for "pretty", "html" or "table", and
``_repr_mimebundle_`` asks :func:`mimebundle`. Renderers register: a view function for a kind
(:func:`register_view`; the built-in text and HTML ones in ``gpumagic.render.text`` and
``gpumagic.render.html`` read each result's row model, ``gpumagic.render.rows``), or a function from a
result to extra mimebundle entries (a PNG, a widget view) for a type (:func:`register`).
Renderer modules are named here or with :func:`add_module` and imported on the first render
only, so importing a result, or gpumagic, stays cheap (the package face names
:mod:`gpumagic.render.widgets`).

>>> register(MyResult, lambda r: {"image/svg+xml": draw(r)})   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Container
from typing import Any

__all__ = [
    "Renderer",
    "add_module",
    "mimebundle",
    "progress",
    "progress_factory",
    "register",
    "register_progress",
    "register_view",
    "renderers_for",
    "repr_html",
    "repr_pretty",
    "to_text",
    "view",
]

Renderer = Callable[[Any], dict[str, Any]]
"""Extra mimebundle entries for one result; may raise ImportError when an optional package is missing."""

_RENDERERS: dict[type, list[Renderer]] = {}
_PENDING: list[str] = []
_PROBLEMS: dict[str, str] = {}

_VIEWS: dict[tuple[str, str], Callable[[Any], str]] = {}
# the modules that register the built-in views; imported on the first view asked for
_VIEW_MODULES = ["gpumagic.render.text", "gpumagic.render.html", "gpumagic.render.progress"]
_PROGRESS: dict[str, Callable[..., Any]] = {}


def register_view(kind: str, type_name: str, fn: Callable[[Any], str]) -> None:
    """Show instances of the type called ``type_name`` (or of its subclasses) as ``kind`` with
    ``fn``: "pretty" (a terminal), "html", or "table" (plain text for scripts and logs). Types
    are named, not imported, so that a renderer never makes a result module load."""
    _VIEWS[(kind, type_name)] = fn


def _load_views() -> None:
    while _VIEW_MODULES:
        name = _VIEW_MODULES.pop(0)
        try:
            importlib.import_module(name)
        except ImportError as e:
            _PROBLEMS[name] = f"{type(e).__name__}: {e}"


def view(obj: Any, kind: str) -> str:
    """``obj`` shown as ``kind`` by the view registered for its type; its ``repr`` (escaped for
    "html") when none can show it, so a broken renderer never hides a result."""
    _load_views()
    fn = next((f for cls in type(obj).__mro__ if (f := _VIEWS.get((kind, cls.__name__))) is not None), None)
    if fn is not None:
        try:
            return fn(obj)
        except Exception as e:  # rendering must never hide the result
            _PROBLEMS[f"{kind} view of {type(obj).__name__}"] = f"{type(e).__name__}: {e}"
    import html

    return html.escape(repr(obj)) if kind == "html" else repr(obj)


# A result class shows itself through these by naming them in its own body
# (``_repr_pretty_ = views.repr_pretty``), not by inheriting them from a base class: IPython's
# pretty printer reads ``_repr_pretty_`` only from a class's own ``__dict__`` before it falls back
# on that class's ``__repr__`` (which every dataclass has), so an inherited one would never run.


def to_text(obj: Any) -> str:
    """Every row as an aligned plain-text table (for scripts and logs)."""
    return view(obj, "table")


def repr_pretty(obj: Any, p: Any, cycle: bool) -> None:
    """IPython's plain-text display (a terminal): the headline, then a short table fitting the terminal."""
    p.text(view(obj, "pretty"))


def repr_html(obj: Any) -> str:
    """The result's compact HTML table (a notebook)."""
    return view(obj, "html")


def register_progress(kind: str, factory: Callable[..., Any]) -> None:
    """The factory of a progress reporter of ``kind`` ("text": a bar on a terminal, lines in a log)."""
    _PROGRESS[kind] = factory


def progress_factory(kind: str) -> Callable[..., Any]:
    """The factory registered for ``kind`` ("text"; "widget" once the IPython layer is imported);
    BadOptions naming the registered kinds for any other."""
    _load_views()
    factory = _PROGRESS.get(kind)
    if factory is None:
        from gpumagic.options import BadOptions

        known = ", ".join(repr(k) for k in sorted(_PROGRESS))
        extra = " ('widget' is registered by gpumagic's IPython layer: %load_ext gpumagic)" if kind == "widget" else ""
        raise BadOptions(f"`progress` {kind!r} is no progress kind; the kinds are {known}{extra}")
    return factory


def progress(kind: str, *args: Any, **kwargs: Any) -> Any:
    """A new progress reporter of ``kind`` (``progress(trial, index)``, then ``close()``): the core
    asks here, so it never imports the renderers that draw progress."""
    return progress_factory(kind)(*args, **kwargs)


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
