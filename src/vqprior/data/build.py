"""From a source to the prepared splits in one streaming pass: decode (files) or take (arrays), clean, split, write.

Memory stays bounded: images go to the split writers as they are decoded (a Parquet row group per 8,192), and the
cleaning keeps only hashes. The train pool (train + val) is processed before test, so a test image that duplicates a
train image is the one dropped: test never leaks into train.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from .clean import DUPLICATE, DUPLICATE_OF_EARLIER_SPLIT, NEAR_DUPLICATE, CleanReport, NearDuplicateIndex, dhash, pixel_hash
from .folder import DecodeSpec, _resize_crop, _to_mode
from ..errors import DataError
from ..io import atomic_group
from .images import SplitWriter

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Job:
    name: str  # file path relative to the root, or "<split>/<index>" for array sources
    label: int  # -1: unknown
    split: str  # train | val | test


def plan(pools: dict[str, list[tuple[str, int]]], rng: np.random.Generator, *, val_fraction: float,
         test_fraction: float, max_train: int | None = None, max_test: int | None = None) -> list[Job]:
    """Assign every (name, label) to a split: a source without a test split gives `test_fraction` of its pool to test;
    `max_*` keep seeded subsets; val is carved from train. Train-pool jobs come first, each pool in its own order."""
    if "all" in pools:
        items = pools["all"]
        is_test = np.zeros(len(items), dtype=bool)
        is_test[rng.permutation(len(items))[: max(1, int(round(len(items) * test_fraction))) if items else 0]] = True
        pools = {"train": [x for x, t in zip(items, is_test) if not t], "test": [x for x, t in zip(items, is_test) if t]}
    train, test = (_subset(pools.get(s, []), limit, rng) for s, limit in (("train", max_train), ("test", max_test)))
    is_val = np.zeros(len(train), dtype=bool)
    is_val[rng.permutation(len(train))[: max(1, int(round(len(train) * val_fraction))) if train else 0]] = True
    return ([Job(n, lab, "val" if v else "train") for (n, lab), v in zip(train, is_val)]
            + [Job(n, lab, "test") for n, lab in test])


def _subset(items: list, limit: int | None, rng: np.random.Generator) -> list:
    if limit is None or limit >= len(items):
        return items
    return [items[i] for i in np.sort(rng.choice(len(items), size=limit, replace=False))]


class Deduplicator:
    """Online duplicate finder: the first copy of an image stays; a later exact copy (decoded pixels) is a `duplicate`
    in its own pool or a `duplicate_of_earlier_split`, and with `near_bits` set a perceptual-hash neighbour within that
    many bits is a `near_duplicate`."""

    def __init__(self, near_bits: int | None = None):
        self.seen: dict[bytes, str] = {}
        self.near = NearDuplicateIndex(near_bits) if near_bits is not None else None

    def check(self, image: np.ndarray, pool: str) -> str | None:
        h = pixel_hash(image)
        if h in self.seen:
            return DUPLICATE if self.seen[h] == pool else DUPLICATE_OF_EARLIER_SPLIT
        if self.near is not None:
            d = dhash(image)
            if self.near.find(d) is not None:
                return NEAR_DUPLICATE
            self.near.add(d)
        self.seen[h] = pool
        return None


def fit_array(image: np.ndarray, spec: DecodeSpec) -> np.ndarray:
    """An in-memory H x W x C uint8 image to the spec's size and channels, exactly as decoded files are."""
    if image.shape == (spec.size, spec.size, spec.channels):
        return image
    im = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
    out = np.asarray(_resize_crop(_to_mode(im, spec.channels), spec.size), dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


def pixel_facts(name: str, pixels: np.ndarray | None) -> dict:
    """Manifest facts of an in-memory image: its size in bytes and the hash of its pixels (no file, no mode)."""
    return {} if pixels is None else {"size": pixels.nbytes, "hash": pixel_hash(pixels).hex()}


def write_splits(jobs: list[Job], images: Iterable[tuple[np.ndarray | None, str | None]], spec: DecodeSpec,
                 out: Path, report: CleanReport, dedupe: Deduplicator | None,
                 facts: Callable[[str, np.ndarray | None], dict] = pixel_facts) -> dict[str, SplitWriter]:
    """Consume (pixels, reason) per job, in job order; drop the bad with their reason, write the rest. Each job becomes
    a manifest row of `report`, with the `facts(name, pixels)` (size, mode, hash) of its file or pixels."""
    # on any error every writer's temporary file goes; on success the three splits appear together
    with atomic_group(), contextlib.ExitStack() as stack:
        writers = {s: stack.enter_context(SplitWriter(out / f"{s}.parquet", spec.size, spec.size, spec.channels))
                   for s in SPLITS}
        for job, (pixels, reason) in zip(jobs, images, strict=True):
            if reason is None and dedupe is not None:
                reason = dedupe.check(pixels, "test" if job.split == "test" else "train")
            report.record(job.name, job.split, reason, label=job.label, **facts(job.name, pixels))
            if reason is None:
                writers[job.split].add(pixels, job.label)
        empty = [s for s in SPLITS if writers[s].count == 0]
        if empty:
            raise DataError(f"no usable images left for the {' and '.join(empty)} split(s) after cleaning "
                            f"(dropped: {report.dropped}); check data.root and the prepare params")
    return writers


def array_images(jobs: list[Job], splits: dict, spec: DecodeSpec) -> Iterator[tuple[np.ndarray, None]]:
    """(pixels, None) per job of an array source; job names are '<source split>/<index>'."""
    for job in jobs:
        split, index = job.name.split("/")
        yield fit_array(splits[split].images[int(index)], spec), None
