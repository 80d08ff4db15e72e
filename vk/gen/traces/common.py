"""Pieces shared by the trace engine, the session builder and --stats: random streams, adjustment notes, the
infinite prefix cache over hash-id blocks."""

from __future__ import annotations

import zlib

import numpy as np


def component_rng(seed: int, name: str, *more: int) -> np.random.Generator:
    """A random stream for (seed, component name, ...), independent of every other component's."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF,
                                                         zlib.crc32(name.encode()), *more]))



class Warnings:
    """Counts of things the conversion had to adjust, reported by --stats and on stderr."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.first_line: dict[str, int] = {}

    def add(self, what: str, line: int, n: int = 1) -> None:
        if what not in self.counts:
            self.counts[what] = 0
            self.first_line[what] = line
        self.counts[what] += n

    def lines(self) -> list[str]:
        return [f"{n} {what} (first at row line {self.first_line[what]})" for what, n in self.counts.items()]


class CacheSim:
    """An infinite prefix cache over hash-id blocks: a block is served if it and every block before it were seen."""

    def __init__(self):
        self.bits = bytearray()
        self.other: set = set()

    def _seen(self, x) -> bool:
        if isinstance(x, int) and 0 <= x < (1 << 40):
            return (x >> 3) < len(self.bits) and bool(self.bits[x >> 3] & (1 << (x & 7)))
        return x in self.other

    def _add(self, x) -> None:
        if isinstance(x, int) and 0 <= x < (1 << 40):
            i = x >> 3
            if i >= len(self.bits):
                self.bits.extend(bytes(max(i + 1 - len(self.bits), len(self.bits) // 2 + 1024)))
            self.bits[i] |= 1 << (x & 7)
        else:
            self.other.add(x)

    def serve(self, ids: list, sizes: list[int]) -> int:
        """Tokens served from cache for a request with these blocks; then the blocks are cached."""
        served = 0
        hit = True
        for x, n in zip(ids, sizes, strict=False):
            if hit and self._seen(x):
                served += n
            else:
                hit = False
            self._add(x)
        return served


def block_sizes(n_ids: int, input_len: int, block_size: int) -> list[int]:
    sizes = [block_size] * n_ids
    sizes[-1] = input_len - block_size * (n_ids - 1)
    return sizes
