"""The Parquet code store: one row per image, codes as a fixed-size list of uint16 (row-major H x W).

Augmented rows (a flipped train image) sit beside the originals, tagged in the `augmentation`
column ("none" for an original), so readers can keep or drop them.

File metadata carries the grid shape, codebook size, the VQ-VAE checkpoint's sha256 and the
prepared data's hash, so a prior never trains on codes from another model by accident.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .data.images import labels_to_numpy, open_parquet, open_parquet_writer
from .errors import InputError

META_KEY = b"vqprior"


@dataclass
class CodeGrid:
    codes: np.ndarray  # N x H x W uint16
    labels: np.ndarray  # N int64, -1 where unknown
    index: np.ndarray  # N int64, row in the prepared split
    augmentation: np.ndarray  # N str: "none" for an original image, else how it was augmented ("hflip")
    meta: dict

    @property
    def grid(self) -> tuple[int, int]:
        return self.meta["grid_height"], self.meta["grid_width"]

    @property
    def codebook_size(self) -> int:
        return self.meta["codebook_size"]


def code_schema(meta: dict) -> pa.Schema:
    length = meta["grid_height"] * meta["grid_width"]
    return pa.schema(
        [
            ("split", pa.string()),
            ("index", pa.int64()),
            ("label", pa.int16()),
            ("augmentation", pa.string()),
            ("codes", pa.list_(pa.uint16(), length)),
        ],
        metadata={META_KEY: json.dumps(meta).encode()},
    )


class CodeWriter:
    """Streams batches into row groups of one Parquet file, renamed into place on success."""

    def __init__(self, path: str | Path, split: str, meta: dict):
        self.split, self.meta = split, meta
        self.schema = code_schema(meta)
        self._stack, self._writer = open_parquet_writer(path, self.schema)
        self.rows = 0

    def write(self, codes: np.ndarray, labels: np.ndarray, index: np.ndarray, augmentation: str = "none") -> None:
        n = len(codes)
        flat = codes.reshape(n, -1).astype(np.uint16)
        if flat.shape[1] != self.meta["grid_height"] * self.meta["grid_width"]:
            raise ValueError(f"codes of shape {codes.shape[1:]} do not match the grid {self.meta['grid_height']}x{self.meta['grid_width']}")
        batch = pa.record_batch(
            [
                pa.array([self.split] * n, pa.string()),
                pa.array(index.astype(np.int64)),
                pa.array(np.where(labels < 0, None, labels).tolist() if (labels < 0).any() else labels.astype(np.int16), pa.int16()),
                pa.array([augmentation] * n, pa.string()),
                pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1]),
            ],
            schema=self.schema,
        )
        self._writer.write_batch(batch)
        self.rows += n

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return self._stack.__exit__(exc_type, exc, tb)


def read_meta(path: str | Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[META_KEY])


def read_codes(path: str | Path, augmentations: bool = True) -> CodeGrid:
    """Whole file to arrays, without a Python loop per row; `augmentations=False` keeps only the original images."""
    path = Path(path)
    schema = open_parquet(path, "extract_codes").schema_arrow
    if missing := [c for c in ("split", "index", "label", "augmentation", "codes") if c not in schema.names]:
        raise InputError(path, "extract_codes", f"lacks the {', '.join(missing)} column(s) (written by older code?)")
    try:
        meta = json.loads((schema.metadata or {})[META_KEY])
        h, w, size = int(meta["grid_height"]), int(meta["grid_width"]), int(meta["codebook_size"])
        table = pq.read_table(path, filters=None if augmentations else [("augmentation", "=", "none")])
        flat = table.column("codes").combine_chunks().flatten().to_numpy()
    except (KeyError, TypeError, ValueError, json.JSONDecodeError):
        raise InputError(path, "extract_codes", "lacks the code store's metadata (grid, codebook size)") from None
    except (pa.ArrowException, OSError) as exc:
        raise InputError(path, "extract_codes", f"is damaged ({exc.__class__.__name__})") from None
    if len(flat) != len(table) * h * w:
        raise InputError(path, "extract_codes", f"holds code rows that are not {h}x{w} grids")
    if len(flat) and int(flat.max()) >= size:  # an embedding lookup would fail with a long IndexError later
        raise InputError(path, "extract_codes", f"holds code {int(flat.max())}, but its codebook has {size} codes "
                         f"(0..{size - 1})")
    return CodeGrid(flat.reshape(len(table), h, w), labels_to_numpy(table.column("label")),
                    table.column("index").to_numpy(), table.column("augmentation").to_numpy(zero_copy_only=False), meta)
