"""A plan never writes: while a dry run runs, the files it would write or remove go nowhere.

The rule is set where Python reaches the file system, not per library: ``open`` (builtins and
``io``: pathlib, numpy, gzip, zipfile, json, logging and every other Python writer end there) and
``os.open`` with a mode or flags that write, create or truncate get a handle on the null device,
and ``os.remove``/``unlink``/``rename``/``replace``/``rmdir``/``mkdir``/``truncate`` do nothing.
Writers that open files in C skip Python's ``open``, so ``torch.save`` is skipped by name, as are
``pickle.dump`` and numpy's savers, which may write to a file the user opened *before* the plan.
Each skipped write is recorded ("ckpt.pt (torch.save)") for the plan's notes.

Only the thread that started the plan is diverted (a kernel's other threads write as usual), and
new temporary files are allowed: a path that ``tempfile`` creates in the temporary directory,
and everything below it, is the plan's own, so code that makes and removes a scratch file keeps
working. Every patch is undone when the guard exits.

>>> with WriteGuard() as g:                                        # doctest: +SKIP
...     open("out.txt", "w").write("x")
>>> g.skipped
['out.txt (open)']
"""

from __future__ import annotations

import builtins
import io
import os
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["WriteGuard"]

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_NEW_ONLY = os.O_CREAT | os.O_EXCL
_MAX_SKIPPED = 1000


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    here = os.path.dirname(os.path.realpath(__file__))
    return (*sorted(dirs), here)


def _name(file: Any) -> str:
    if isinstance(file, (str, bytes, os.PathLike)):
        path = os.fsdecode(os.fspath(file))
        return path
    name = getattr(file, "name", None)
    return name if isinstance(name, str) else f"a {type(file).__name__} object"


_ALIASES: dict[str, list[str]] = {}
"""module name -> its globals bound to Python's open, for the modules scanned so far (once each)."""


def _open_aliases(original_open: Any) -> list[tuple[Any, str]]:
    out: list[tuple[Any, str]] = []
    for name, mod in list(sys.modules.items()):
        keys = _ALIASES.get(name)
        d = getattr(mod, "__dict__", None)
        if not isinstance(d, dict) or mod is builtins or mod is io:
            continue
        if keys is None:
            keys = _ALIASES[name] = [k for k, v in list(d.items()) if v is original_open]
        out.extend((mod, k) for k in keys if d.get(k) is original_open)
    return out


class WriteGuard:
    """Divert the current thread's file writes to nothing while active; ``skipped`` lists what."""

    def __init__(self) -> None:
        self.skipped: list[str] = []
        self._thread = threading.get_ident()
        self._undo: list[Callable[[], None]] = []
        self._own: list[str] = []  # temporary paths the plan created: writes below them pass
        self._tmp = os.path.realpath(tempfile.gettempdir())
        self._libs = _library_dirs()

    # -- what is diverted ---------------------------------------------------------------------
    def _active(self) -> bool:
        return threading.get_ident() == self._thread

    def _owned(self, path: Any) -> bool:
        try:
            real = os.path.realpath(os.fsdecode(os.fspath(path)))
        except (TypeError, ValueError):
            return False
        return any(real == p or real.startswith(p + os.sep) for p in self._own)

    def _new_temporary(self, path: Any) -> bool:
        """A new path that ``tempfile`` creates in the temporary directory: the plan may create it."""
        caller = sys._getframe(2)
        if caller.f_globals.get("__name__") != "tempfile":
            return False
        try:
            real = os.path.realpath(os.fsdecode(os.fspath(path)))
        except (TypeError, ValueError):
            return False
        if not real.startswith(self._tmp + os.sep) or os.path.lexists(real):
            return False
        self._own.append(real)
        return True

    def _caller(self, fallback: str) -> str:
        """The library function the user's code called ('numpy.save'), else ``fallback``."""
        f: Any = sys._getframe(2)
        outer: Any = None
        while f is not None:
            name = os.path.realpath(f.f_code.co_filename) if not f.f_code.co_filename.startswith("<") \
                else f.f_code.co_filename
            if not (name.startswith(self._libs) or name.startswith("<frozen")):
                break
            outer = f
            f = f.f_back
        if outer is None:
            return fallback
        module = str(outer.f_globals.get("__name__", "")).split(".")[0]
        qual = getattr(outer.f_code, "co_qualname", outer.f_code.co_name)
        if module in ("gpumagic", "") or qual.startswith("<"):
            return fallback
        return f"{module}.{qual}"

    def _skip(self, what: str, how: str) -> None:
        entry = f"{what} ({how})"
        if entry not in self.skipped and len(self.skipped) < _MAX_SKIPPED:
            self.skipped.append(entry)

    # -- the patches --------------------------------------------------------------------------
    def _patch(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        old = getattr(owner, name, None)
        if old is None:
            return
        setattr(owner, name, make(old))
        self._undo.append(lambda: setattr(owner, name, old))

    def __enter__(self) -> WriteGuard:
        try:
            self._install()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._restore()

    def _restore(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _install(self) -> None:
        guard = self
        original_open = io.open

        def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            writes = isinstance(mode, str) and any(c in mode for c in "wax+")
            # an opener opens the file itself (through os.open, diverted below); a descriptor is open already
            passes = isinstance(file, int) or kwargs.get("opener") is not None or len(args) >= 6
            if not (writes and guard._active()) or passes or guard._owned(file):
                return original_open(file, mode, *args, **kwargs)
            if "x" in mode and guard._new_temporary(file):
                return original_open(file, mode, *args, **kwargs)
            guard._skip(_name(file), guard._caller("open"))
            null = mode.replace("x", "w").replace("a", "w")
            return original_open(os.devnull, null, *args, **kwargs)

        for owner in (builtins, io):
            self._patch(owner, "open", lambda old: open_)
        # modules that took Python's open under a name of their own (IPython's `open` for the cell
        # calls `io_open`, imported from io before any plan): theirs is diverted too
        for mod, key in _open_aliases(original_open):
            self._patch(mod, key, lambda old: open_)

        def os_open(old: Any) -> Any:
            def patched(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
                if not (flags & _WRITE_FLAGS and guard._active()) or dir_fd is not None or guard._owned(path):
                    return int(old(path, flags, mode, dir_fd=dir_fd))
                if flags & _NEW_ONLY == _NEW_ONLY and guard._new_temporary(path):
                    return int(old(path, flags, mode))
                guard._skip(_name(path), guard._caller("os.open"))
                return int(old(os.devnull, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)))
            return patched

        self._patch(os, "open", os_open)

        def changes(op: str) -> Callable[[Any], Any]:
            def make(old: Any) -> Any:
                def patched(path: Any, *args: Any, **kwargs: Any) -> Any:
                    if not guard._active() or kwargs.get("dir_fd") is not None or guard._owned(path):
                        return old(path, *args, **kwargs)
                    if op == "mkdir" and guard._new_temporary(path):
                        return old(path, *args, **kwargs)
                    guard._skip(_name(path), guard._caller(f"os.{op}"))
                    return None
                return patched
            return make

        for op in ("remove", "unlink", "rename", "replace", "rmdir", "mkdir", "truncate"):
            self._patch(os, op, changes(op))

        def skipped_by_name(label: str, target: int) -> Callable[[Any], Any]:
            def make(old: Any) -> Any:
                def patched(*args: Any, **kwargs: Any) -> Any:
                    if not guard._active():
                        return old(*args, **kwargs)
                    file = args[target] if len(args) > target else kwargs.get("f", kwargs.get("file", kwargs.get(
                        "fname", "?")))
                    guard._skip(_name(file), label)
                    return None
                return patched
            return make

        torch = sys.modules.get("torch")
        if torch is not None:
            serialization = sys.modules.get("torch.serialization")
            self._patch(torch, "save", skipped_by_name("torch.save", 1))
            if serialization is not None:
                self._patch(serialization, "save", skipped_by_name("torch.save", 1))
        import pickle

        self._patch(pickle, "dump", skipped_by_name("pickle.dump", 1))
        np = sys.modules.get("numpy")
        if np is not None:
            for fn in ("save", "savez", "savez_compressed", "savetxt"):
                self._patch(np, fn, skipped_by_name(f"numpy.{fn}", 0))
