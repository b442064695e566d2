"""Cleaning and splitting: exact duplicates out (test images never leak into train), seeded val split."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .sources import RawSplit


@dataclass
class CleanReport:
    counts_in: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)  # reason -> split -> count
    split_sizes: dict = field(default_factory=dict)
    class_balance: dict = field(default_factory=dict)

    def drop(self, reason: str, split: str, n: int) -> None:
        self.dropped.setdefault(reason, {})[split] = self.dropped.get(reason, {}).get(split, 0) + int(n)

    def as_dict(self) -> dict:
        return {
            "counts_in": self.counts_in,
            "dropped": self.dropped,
            "dropped_total": sum(sum(v.values()) for v in self.dropped.values()),
            "split_sizes": self.split_sizes,
            "class_balance": self.class_balance,
        }


def pixel_hashes(images: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(img.tobytes(), digest_size=16).digest() for img in images]


def drop_duplicates(splits: dict[str, RawSplit], order: list[str], report: CleanReport) -> dict[str, RawSplit]:
    """Keep the first copy of each image, scanning splits in `order` (train first, so test keeps no train copies)."""
    seen: set[bytes] = set()
    out = {}
    for name in order:
        split = splits[name]
        keep = np.zeros(len(split.images), dtype=bool)
        within = across = 0
        local: set[bytes] = set()
        for i, h in enumerate(pixel_hashes(split.images)):
            if h in local:
                within += 1
            elif h in seen:
                across += 1
            else:
                keep[i] = True
                local.add(h)
        seen |= local
        if within:
            report.drop("duplicate", name, within)
        if across:
            report.drop("duplicate_of_earlier_split", name, across)
        out[name] = RawSplit(split.images[keep], split.labels[keep])
    return out


def subset(split: RawSplit, limit: int | None, rng: np.random.Generator) -> RawSplit:
    if limit is None or limit >= len(split.images):
        return split
    idx = np.sort(rng.choice(len(split.images), size=limit, replace=False))
    return RawSplit(split.images[idx], split.labels[idx])


def carve_val(train: RawSplit, val_fraction: float, rng: np.random.Generator) -> tuple[RawSplit, RawSplit]:
    perm = rng.permutation(len(train.images))
    n_val = max(1, int(round(len(perm) * val_fraction)))
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return RawSplit(train.images[train_idx], train.labels[train_idx]), RawSplit(train.images[val_idx], train.labels[val_idx])
