"""Cleaning: the report (every drop counted by reason, with a few example names) and the image identities it uses:
an exact hash of the decoded pixels and a perceptual hash with a fast index for near-duplicates. The streaming pass
that applies them is build.py."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


DUPLICATE, DUPLICATE_OF_EARLIER_SPLIT, NEAR_DUPLICATE = "duplicate", "duplicate_of_earlier_split", "near_duplicate"
EXAMPLES_PER_REASON = 5


@dataclass
class CleanReport:
    counts_in: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)  # reason -> split -> count
    examples: dict = field(default_factory=dict)  # reason -> the first few names dropped for it
    split_sizes: dict = field(default_factory=dict)
    class_balance: dict = field(default_factory=dict)

    def drop(self, reason: str, split: str, n: int = 1, examples=()) -> None:
        self.dropped.setdefault(reason, {})[split] = self.dropped.get(reason, {}).get(split, 0) + int(n)
        kept = self.examples.setdefault(reason, [])
        kept += list(examples)[: EXAMPLES_PER_REASON - len(kept)]

    def as_dict(self) -> dict:
        return {
            "counts_in": self.counts_in,
            "dropped": self.dropped,
            "dropped_total": sum(sum(v.values()) for v in self.dropped.values()),
            "examples": {k: v for k, v in self.examples.items() if v},
            "split_sizes": self.split_sizes,
            "class_balance": self.class_balance,
        }


def pixel_hash(image: np.ndarray) -> bytes:
    """Identity of the decoded pixels (shape included): equal files under other names, or re-encoded losslessly."""
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes() + str(image.shape).encode(), digest_size=16).digest()


def pixel_hashes(images: np.ndarray) -> list[bytes]:
    return [pixel_hash(img) for img in images]


def dhash(image: np.ndarray) -> int:
    """64-bit difference hash of an H x W x C uint8 image: gray 9x8 thumbnail, one bit per horizontal neighbour pair.
    Survives resizing, re-compression and small edits; a few differing bits mean near-identical images."""
    gray = image.mean(axis=2).astype(np.uint8) if image.shape[2] > 1 else image[..., 0]
    thumb = np.asarray(Image.fromarray(gray).resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (thumb[:, 1:] > thumb[:, :-1]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


class NearDuplicateIndex:
    """Finds an earlier hash within `max_bits` Hamming distance without comparing all pairs: the 64 bits are cut into
    max_bits + 1 bands, and two hashes that close must agree exactly on at least one band (pigeonhole)."""

    def __init__(self, max_bits: int):
        self.max_bits = max_bits
        edges = [int(e) for e in np.linspace(0, 64, max_bits + 2).round()]  # Python ints: hashes use all 64 bits
        self.bands = [((1 << (b - a)) - 1, 64 - b) for a, b in zip(edges[:-1], edges[1:])]  # (mask, shift)
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.bands]

    def _keys(self, h: int):
        return [(h >> shift) & mask for mask, shift in self.bands]

    def find(self, h: int) -> int | None:
        for table, key in zip(self.tables, self._keys(h)):
            for other in table.get(key, ()):
                if (h ^ other).bit_count() <= self.max_bits:
                    return other
        return None

    def add(self, h: int) -> None:
        for table, key in zip(self.tables, self._keys(h)):
            table.setdefault(key, []).append(h)
