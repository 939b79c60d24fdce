"""Which buffers hold a tensor's elements, for every kind of tensor a notebook can hold.

A strided tensor has one storage. A sparse COO tensor has two (indices and values), a
compressed one (CSR, CSC, BSR, BSC) three (compressed indices, plain indices, values); a
wrapper subclass that can flatten itself (``__tensor_flatten__``) has those of its inner
tensors. Fake and functional tensors hold no memory of their own and are never asked for a data
pointer (PyTorch warns about that). Opaque tensors (``to_mkldnn()``) and subclasses that cannot
say what they hold are *unreadable*: :func:`storages` returns None and the caller says so.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

__all__ = ["components", "is_fake", "storages", "unreadable_kind"]

_Tensor = torch.Tensor
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_COMPRESSED_ROWS = (torch.sparse_csr, torch.sparse_bsr)
_COMPRESSED_COLS = (torch.sparse_csc, torch.sparse_bsc)


def is_fake(t: Any) -> bool:
    """A FakeTensor or FunctionalTensor (no memory of its own), checked without importing them."""
    if type(t) in _PLAIN_TYPES:
        return False
    for module, name in (("torch._subclasses.fake_tensor", "FakeTensor"),
                         ("torch._subclasses.functional_tensor", "FunctionalTensor")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(t, cls):
            return True
    return False


def _parts(t: torch.Tensor, depth: int, fakes: bool = False) -> list[torch.Tensor] | None:
    fake = type(t) not in _PLAIN_TYPES and is_fake(t)
    if fake and not fakes:
        return []
    if type(t) not in _PLAIN_TYPES and not fake:
        flatten = getattr(t, "__tensor_flatten__", None)
        if flatten is not None and depth < 4:
            names, _ = flatten()
            out: list[torch.Tensor] = []
            for n in names:
                value = getattr(t, n, None)
                if not isinstance(value, torch.Tensor):  # flattened context: a DTensor's device mesh
                    continue
                inner = _parts(value, depth + 1, fakes)
                if inner is None:
                    return None
                out.extend(inner)
            return out
    layout = t.layout
    if layout is torch.strided:
        return [t]
    if layout is torch.sparse_coo:
        return [t._indices(), t._values()]
    if layout in _COMPRESSED_ROWS:
        return [t.crow_indices(), t.col_indices(), t.values()]
    if layout in _COMPRESSED_COLS:
        return [t.ccol_indices(), t.row_indices(), t.values()]
    return None


def components(t: torch.Tensor) -> list[torch.Tensor] | None:
    """The strided tensors whose storages hold ``t``'s elements, fake tensors included (a fake
    sparse tensor's fake indices and values); None when ``t`` cannot say.

    >>> len(components(torch.eye(3).to_sparse_csr()))  # compressed rows, columns, values
    3
    """
    return _parts(t, 0, fakes=True)


def storages(t: torch.Tensor) -> list[tuple[int, Any]] | None:
    """[(data pointer, untyped storage)] of the buffers holding ``t``'s elements; None if unreadable.

    Buffers without memory (meta, fake, empty) are left out.

    >>> len(storages(torch.eye(3).to_sparse()))  # indices and values
    2
    """
    parts = _parts(t, 0)
    if parts is None:
        return None
    out = []
    for p in parts:
        try:
            st = p.untyped_storage()
            key = st.data_ptr()
        except (NotImplementedError, RuntimeError):  # a wrapper subclass without a storage of its own
            return None
        if key:
            out.append((key, st))
    return out


def unreadable_kind(t: torch.Tensor) -> str:
    """How the report names a tensor whose memory cannot be read: "mkldnn", a subclass name, a layout."""
    if type(t) not in _PLAIN_TYPES:
        return type(t).__name__
    return str(t.layout).removeprefix("torch.").lstrip("_")
