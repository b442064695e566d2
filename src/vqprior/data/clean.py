"""Cleaning: the manifest (one row per file or array image seen: kept, or dropped with its reason), the report whose
counts are derived from it, and the image identities it uses: an exact hash of the decoded pixels and a perceptual hash
with a fast index for near-duplicates. The streaming pass that applies them is build.py."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import atomic_path


DUPLICATE, DUPLICATE_OF_EARLIER_SPLIT, NEAR_DUPLICATE = "duplicate", "duplicate_of_earlier_split", "near_duplicate"
EXAMPLES_PER_REASON = 5


MANIFEST_COLUMNS = ("path", "label", "class", "split", "verdict", "reason", "size", "mode", "hash")
NOT_SPLIT = "scan"  # the report's split for entries dropped before they were given one (links, hidden files)


@dataclass
class CleanReport:
    """Every file (or array image) seen, one manifest row each; the report's numbers are counted from the rows, so
    they add up to what was seen. `classes[label]` names a label."""

    counts_in: dict = field(default_factory=dict)
    classes: list = field(default_factory=list)
    rows: dict = field(default_factory=lambda: {c: [] for c in MANIFEST_COLUMNS})

    def record(self, path: str, split: str | None, reason: str | None = None, label: int = -1, size: int | None = None,
               mode: int | None = None, hash: str | None = None) -> None:
        """One entry seen: kept in `split` when `reason` is None, else dropped for `reason`."""
        named = self.classes[label] if 0 <= label < len(self.classes) else None
        for column, value in zip(MANIFEST_COLUMNS, (path, None if label < 0 else label, named, split,
                                                    "dropped" if reason else "kept", reason, size,
                                                    None if mode is None else f"{mode:04o}", hash)):
            self.rows[column].append(value)

    def drop(self, reason: str, split: str | None, examples=()) -> None:
        for name in examples:
            self.record(name, None if split == NOT_SPLIT else split, reason)

    def _entries(self):
        return zip(*(self.rows[c] for c in ("path", "label", "split", "reason")))

    @property
    def dropped(self) -> dict:
        """reason -> split -> count."""
        out: dict = {}
        for _, _, split, reason in self._entries():
            if reason:
                by_split = out.setdefault(reason, {})
                by_split[split or NOT_SPLIT] = by_split.get(split or NOT_SPLIT, 0) + 1
        return out

    @property
    def examples(self) -> dict:
        """reason -> the first few names dropped for it."""
        out: dict = {}
        for path, _, _, reason in self._entries():
            if reason and len(names := out.setdefault(reason, [])) < EXAMPLES_PER_REASON:
                names.append(path)
        return out

    def as_dict(self) -> dict:
        dropped = self.dropped
        split_sizes, class_balance = {}, {}
        for _, label, split, reason in self._entries():
            if reason is None:
                split_sizes[split] = split_sizes.get(split, 0) + 1
                balance = class_balance.setdefault(split, {})
                key = -1 if label is None else label
                balance[key] = balance.get(key, 0) + 1
        return {
            "counts_in": self.counts_in,
            "seen": len(self.rows["path"]),
            "kept": sum(split_sizes.values()),
            "dropped": dropped,
            "dropped_total": sum(sum(v.values()) for v in dropped.values()),
            "examples": self.examples,
            "split_sizes": split_sizes,
            "class_balance": {s: dict(sorted(b.items())) for s, b in class_balance.items()},
        }

    def write_manifest(self, path: str | Path) -> None:
        """The rows as Parquet, for pandas: `pd.read_parquet(path).query("reason == 'duplicate'")`."""
        import pandas as pd

        frame = pd.DataFrame({c: self.rows[c] for c in MANIFEST_COLUMNS})
        frame["label"] = frame["label"].astype("Int16")
        frame["size"] = frame["size"].astype("Int64")
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)


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
