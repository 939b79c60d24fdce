"""Imports that an interrupt cannot leave half done.

When an import fails part way (a Ctrl-C during torch's lazy ``import sympy`` in a first dry run),
Python drops the modules whose code raised, but keeps their submodules that had finished. A later
import runs the package again as a new module, and the submodules it finds cached are never bound
to it: ``module 'sympy' has no attribute 'printing'`` in every later cell, until a restart. The
rule here: a module imported during a block that failed, whose package is gone, goes too, so the
next import runs the package whole.

>>> with orphans_dropped():
...     import json
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["drop_orphans", "orphans_dropped"]


def drop_orphans(before: set[str]) -> list[str]:
    """Remove from ``sys.modules`` the modules not in ``before`` one of whose packages is no longer
    imported; returns their names."""
    modules = sys.modules
    orphans = []
    for name in [n for n in list(modules) if n not in before and "." in n]:
        parts = name.split(".")
        if any(".".join(parts[:i]) not in modules for i in range(1, len(parts))):
            orphans.append(name)
    for name in orphans:
        modules.pop(name, None)
    return orphans


@contextmanager
def orphans_dropped() -> Iterator[None]:
    """Run the block; when it ends with an exception (a Ctrl-C included), drop the modules it
    imported whose package failed to import (:func:`drop_orphans`)."""
    before = set(sys.modules)
    try:
        yield
    except BaseException:
        drop_orphans(before)
        raise
