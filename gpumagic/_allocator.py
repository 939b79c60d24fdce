"""A model of PyTorch's CUDA caching allocator, fed allocations and frees in program order.

It predicts what ``torch.cuda.memory_allocated`` (block sizes, rounded) and
``memory_reserved`` (segments obtained from cudaMalloc) would read, from the rules of
``c10/cuda/CUDACachingAllocator.cpp`` (default configuration, one stream):

* a request is rounded up to a multiple of 512 bytes (``kMinBlockSize``);
* requests up to 1 MiB (``kSmallSize``) are served from the small pool, whose segments are
  2 MiB (``kSmallBuffer``); larger ones from the large pool, whose segments are 20 MiB
  (``kLargeBuffer``) below 10 MiB (``kMinLargeAlloc``) and the request rounded up to 2 MiB
  (``kRoundLarge``) from there;
* a request takes the smallest cached free block that is large enough (best fit), split when the
  rest is at least 512 bytes (small pool) or more than 1 MiB (large pool);
* a freed block merges with free neighbours of the same segment and stays cached (reserved);
* when a new segment would pass the capacity, unsplit cached segments are released first.

>>> a = CachingAllocatorModel()
>>> k = a.malloc(1000); a.allocated, a.reserved
(1024, 2097152)
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

__all__ = ["CachingAllocatorModel", "round_size"]

K_MIN_BLOCK = 512
K_SMALL_SIZE = 1 << 20
K_SMALL_BUFFER = 2 << 20
K_LARGE_BUFFER = 20 << 20
K_MIN_LARGE_ALLOC = 10 << 20
K_ROUND_LARGE = 2 << 20


def round_size(size: int) -> int:
    """Bytes the allocator hands out for a request of ``size``: a multiple of 512, at least 512."""
    if size < K_MIN_BLOCK:
        return K_MIN_BLOCK
    return K_MIN_BLOCK * ((size + K_MIN_BLOCK - 1) // K_MIN_BLOCK)


def _segment_size(size: int) -> int:
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * ((size + K_ROUND_LARGE - 1) // K_ROUND_LARGE)


@dataclass(eq=False)
class _Block:
    id: int
    size: int
    small: bool
    segment: int
    prev: _Block | None = None
    next: _Block | None = None
    free: bool = True


class CachingAllocatorModel:
    """Allocated and reserved bytes of the caching allocator, with their peaks."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self._ids = itertools.count(1)
        self._free: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # (size, id), sorted
        self._blocks: dict[int, _Block] = {}
        self._segments: dict[int, int] = {}  # segment id -> bytes

    def malloc(self, size: int) -> int:
        """Allocate ``size`` bytes; returns a key for :meth:`free`."""
        size = round_size(size)
        small = size <= K_SMALL_SIZE
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, 0))
        if i < len(pool):
            _, bid = pool.pop(i)
            block = self._blocks[bid]
        else:
            block = self._new_segment(size, small)
        rest = block.size - size
        if rest >= K_MIN_BLOCK if small else rest > K_SMALL_SIZE:
            tail = _Block(next(self._ids), rest, small, block.segment, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = tail
            block.next = tail
            block.size = size
            self._blocks[tail.id] = tail
            bisect.insort(pool, (tail.size, tail.id))
        block.free = False
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block.id

    def free(self, key: int) -> None:
        block = self._blocks.get(key)
        if block is None or block.free:
            return
        self.allocated -= block.size
        block.free = True
        pool = self._free[block.small]
        for other in (block.prev, block.next):
            if other is not None and other.free:
                pool.pop(bisect.bisect_left(pool, (other.size, other.id)))
                if other is block.prev:
                    other.size += block.size
                    other.next = block.next
                    if block.next is not None:
                        block.next.prev = other
                    del self._blocks[block.id]
                    block = other
                else:
                    block.size += other.size
                    block.next = other.next
                    if other.next is not None:
                        other.next.prev = block
                    del self._blocks[other.id]
        bisect.insort(pool, (block.size, block.id))

    def _new_segment(self, size: int, small: bool) -> _Block:
        seg = _segment_size(size)
        if self.capacity is not None and self.reserved + seg > self.capacity:
            self._release_cached()
        sid = next(self._ids)
        self._segments[sid] = seg
        self.reserved += seg
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        block = _Block(next(self._ids), seg, small, sid)
        self._blocks[block.id] = block
        return block

    def _release_cached(self) -> None:
        """What the allocator does before giving up: return whole free segments to the driver."""
        for small in (True, False):
            pool = self._free[small]
            keep = []
            for size, bid in pool:
                b = self._blocks[bid]
                if b.prev is None and b.next is None:
                    self.reserved -= self._segments.pop(b.segment)
                    del self._blocks[bid]
                else:
                    keep.append((size, bid))
            self._free[small] = keep
