"""Anonymous shared memory (a memfd) through which weights reach the vLLM workers of this machine.

The writer is a trainer rank (the weights of a sync, for every engine on its node) or an engine (the
buckets it pulled from Ray's object store for a trainer on another node); the readers are vLLM workers,
which open the arena through `/proc/<writer pid>/fd/<fd>` (same user, same machine) and map it read-only.
It has no name anywhere, so nothing outlives the writer (no file, no /dev/shm entry after a crash). It is
kept between syncs and grown when needed, so its pages are faulted in once, not on every sync.

A layout entry is (name, dtype, shape, byte offset): what a reader needs to view a tensor in place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class PublishedWeights:
    """Where the trainer put one sync's weights (`TrainEngine.publish_weights`): its shared-memory arena on
    node `node` (path, size, layout), for engines there; Ray object-store references of `WeightBucket`s,
    for engines on other nodes. Either is None when no engine needs it."""

    node: str
    arena: tuple[str, int, list] | None
    refs: list | None


class WeightArena:
    """A growable memfd that tensors are copied into; readers map it by `path`."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.size = 0
        self.end = 0  # where the last `stage` stopped (aligned): the next bucket's offset
        self._map = None

    @property
    def path(self) -> str:
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def stage(self, tensors, offset: int = 0, placement: dict[str, int] | None = None,
              ) -> list[tuple[str, str, tuple[int, ...], int]]:
        """Copy (name, tensor) pairs into the arena: a name in `placement` at the byte offset it gives, the
        others one after another from byte `offset` on (the arena grows if needed, keeping its content);
        returns each one's (name, dtype, shape, byte offset)."""
        import torch

        tensors = list(tensors)
        layout, top = [], 0
        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            start = placement.get(name) if placement else None
            if start is None:
                start, offset = offset, offset + aligned(nbytes)
            layout.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), start))
            top = max(top, start + nbytes)
        self._reserve(max(top, offset))
        self.end = offset
        arena = torch.frombuffer(self._map, dtype=torch.uint8)
        try:
            for (_, t), (_, _, _, start) in zip(tensors, layout, strict=True):
                n = t.numel() * t.element_size()
                arena[start : start + n].copy_(t.detach().reshape(-1).view(torch.uint8))
        finally:
            del arena  # the mapping can be resized or closed only without views on it
        return layout

    def _reserve(self, nbytes: int) -> None:
        """At least `nbytes`, the content kept (a memfd grows in place; only the mapping is redone)."""
        import mmap

        if nbytes <= self.size:
            return
        if self.fd is None:
            self.fd = os.memfd_create("thinkrl-weights")
        os.ftruncate(self.fd, nbytes)
        if self._map is not None:
            self._map.close()
        self._map = mmap.mmap(self.fd, nbytes)
        self.size = nbytes

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        if self.fd is not None:
            os.close(self.fd)
        self.fd, self.size, self.end, self._map = None, 0, 0, None


def aligned(nbytes: int, to: int = 64) -> int:
    return (nbytes + to - 1) // to * to
