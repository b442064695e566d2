"""The prepared image store (one Parquet file per split) and the pixel normalisation.

Pixels are stored as uint8 (4x smaller than floats, exact); the normalisation (to [-1, 1], or per-channel
standardisation) is applied when batches are loaded, and `stats.json` records it so decoding can invert it.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..errors import DataError, InputError, require
from ..io import atomic_path

ROW_GROUP = 8192


@dataclass
class ImageSplit:
    images: np.ndarray  # N x H x W x C uint8
    labels: np.ndarray  # N int64 (-1 where unknown)
    index: np.ndarray  # N int64, row in the prepared split

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


def image_schema(height: int, width: int, channels: int) -> pa.Schema:
    meta = {b"height": str(height).encode(), b"width": str(width).encode(), b"channels": str(channels).encode()}
    return pa.schema(
        [
            ("index", pa.int64()),
            ("label", pa.int16()),
            ("pixels", pa.list_(pa.uint8(), height * width * channels)),
        ],
        metadata=meta,
    )


class SplitWriter:
    """Appends images to a prepared split, one Parquet row group per ROW_GROUP images, so memory stays flat however
    large the split. The file appears (renamed from a temporary one) only when the `with` block ends cleanly.
    Counts per label and per-channel pixel sums ride along for the report and stats.json."""

    def __init__(self, path: str | Path, height: int, width: int, channels: int):
        self.path, self.shape = Path(path), (height, width, channels)
        self.schema = image_schema(height, width, channels)
        # row groups of about 8 MB of pixels (8,192 Fashion-MNIST images, fewer large ones): the buffer and the Parquet
        # encoder (which needs several times a group) bound the memory
        self.group_rows = max(16, min(ROW_GROUP, (8 << 20) // (height * width * channels)))
        self.count, self.label_counts = 0, {}  # images added so far, written or buffered
        self._sum, self._sumsq = np.zeros(channels, np.uint64), np.zeros(channels, np.uint64)
        self._images, self._labels = [], []

    def __enter__(self) -> "SplitWriter":
        self._stack, self._writer = open_parquet_writer(self.path, self.schema)
        return self

    def add(self, image: np.ndarray, label: int) -> None:
        if image.shape != self.shape:
            raise ValueError(f"{self.path.name}: image of shape {image.shape}, the split holds {self.shape}")
        self._images.append(image)
        self._labels.append(int(label))
        self.count += 1
        self._sum += image.sum(axis=(0, 1), dtype=np.uint64)  # exact integer sums; per image, so no big temporaries
        self._sumsq += np.square(image, dtype=np.uint32).sum(axis=(0, 1), dtype=np.uint64)
        if len(self._images) >= self.group_rows:
            self._flush()

    def add_batch(self, images: np.ndarray, labels: np.ndarray) -> None:
        for image, label in zip(images, labels):
            self.add(image, label)

    def _flush(self) -> None:
        if not self._images:
            return
        images, labels = np.stack(self._images), np.asarray(self._labels, dtype=np.int64)
        n, size = len(images), int(np.prod(self.shape))
        for k, v in zip(*np.unique(labels, return_counts=True)):
            self.label_counts[int(k)] = self.label_counts.get(int(k), 0) + int(v)
        pixels = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), size)
        index = pa.array(np.arange(self.count - n, self.count))  # count already holds the buffered images
        self._writer.write_batch(pa.record_batch([index, pa.array(labels.astype(np.int16)), pixels], schema=self.schema))
        self._images, self._labels = [], []

    def channel_stats(self) -> dict:
        """Per-channel mean and std of the written pixels, in [0, 1] units."""
        pixels = max(1, self.count * self.shape[0] * self.shape[1])
        mean = self._sum / (pixels * 255.0)
        return {"mean": mean.tolist(), "std": np.sqrt(np.maximum(self._sumsq / (pixels * 255.0**2) - mean**2, 0)).tolist()}

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            with self._stack:  # a failing last flush (a full disk) reaches the stack too, so the temp file goes
                self._flush()
            return False
        return self._stack.__exit__(exc_type, exc, tb)


def write_images(path: str | Path, images: np.ndarray, labels: np.ndarray) -> None:
    with SplitWriter(path, *images.shape[1:]) as writer:
        writer.add_batch(images, labels)


def _image_shape(path: Path, schema: pa.Schema) -> tuple[int, int, int]:
    meta = schema.metadata or {}
    try:
        return tuple(int(meta[k]) for k in (b"height", b"width", b"channels"))
    except KeyError:
        raise InputError(path, "prepare", "lacks height/width/channels metadata") from None


def labels_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A nullable label column -> int64 with -1 where the label is unknown."""
    return column.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def open_parquet_writer(path: str | Path, schema: pa.Schema) -> tuple[contextlib.ExitStack, pq.ParquetWriter]:
    """A ParquetWriter on a temporary file that the returned stack closes and renames onto `path` when it exits
    cleanly; on an error, here or at any later point, the temporary file goes."""
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(path))
        writer = stack.enter_context(pq.ParquetWriter(tmp, schema))
        return stack.pop_all(), writer


def open_parquet(path: str | Path, stage: str) -> pq.ParquetFile:
    """A Parquet file a stage wrote; missing or unreadable (truncated, not Parquet) stops with one line naming `stage`."""
    path = require(path, stage)
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(path, stage, f"is not a readable Parquet file ({exc.__class__.__name__})") from None


def read_images(path: str | Path, limit: int | None = None) -> ImageSplit:
    table = open_parquet(path, "prepare").read()
    h, w, c = _image_shape(path, table.schema)
    if limit is not None:
        table = table.slice(0, limit)
    pixels = table.column("pixels").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return ImageSplit(pixels.reshape(len(table), h, w, c), labels_to_numpy(table.column("label")),
                      table.column("index").to_numpy())


@dataclass(frozen=True)
class Normalisation:
    """uint8 pixels <-> model inputs: y = (pixel / 255 - mean) / std per channel.

    The default (mean 0.5, std 0.5) scales to [-1, 1]; `standardize` uses the train split's per-channel
    statistics. stats.json and the VQ-VAE checkpoint both carry it, so every decoding inverts the same map."""

    kind: str = "scale"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    @classmethod
    def from_train_stats(cls, kind: str, pixel_stats: dict) -> "Normalisation":
        if kind == "scale":
            return cls()
        if min(pixel_stats["std"]) < 1e-3:
            raise DataError(f"a train channel is constant (std {pixel_stats['std']}); standardisation would divide "
                             "by ~0: set prepare.normalisation: scale")
        return cls("standardize", tuple(pixel_stats["mean"]), tuple(pixel_stats["std"]))

    @classmethod
    def from_dict(cls, d: dict | None) -> "Normalisation":
        return cls() if d is None else cls(d["kind"], tuple(d["mean"]), tuple(d["std"]))

    def as_dict(self) -> dict:
        return {"kind": self.kind, "mean": list(self.mean), "std": list(self.std),
                "formula": "model input = (pixel / 255 - mean) / std, per channel"}

    def _view(self, values: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)

    def to_model(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x C -> float N x C x H x W."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.require(images, requirements="W"))  # Parquet buffers are read-only
        # NCHW strides: the permuted NHWC layout reads as channels-last to torch, and a VQ-VAE fed channels-last
        # runs channels-last throughout, where CPU GroupNorm is ~4x slower (3 of the 16 s of extract_codes)
        x = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
        return (x - self._view(self.mean, x)) / self._view(self.std, x)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> pixels in [0, 1] units (not clamped: errors are measured here)."""
        x = x.float()
        return x * self._view(self.std, x) + self._view(self.mean, x)

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> uint8 N x C x H x W (the layout torch-fidelity expects)."""
        return self.to_unit(x).mul(255.0).round().clamp(0, 255).to(torch.uint8)


def load_stats(folder: str | Path, needs: tuple[str, ...] = ("sha256",)) -> dict:
    """prepare's summary of the prepared splits (shape, counts, normalisation, hashes), with the keys a stage `needs`."""
    path = require(Path(folder) / "stats.json", "prepare")
    try:
        stats = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(path, "prepare", "is not valid JSON") from None
    if not isinstance(stats, dict):
        raise InputError(path, "prepare", f"holds a JSON {type(stats).__name__}, not an object")
    if missing := [k for k in needs if k not in stats]:
        raise InputError(path, "prepare", f"lacks {', '.join(missing)} (written by older code?)")
    return stats


def iter_image_batches(path: str | Path, batch_size: int):
    """Stream (images N x H x W x C uint8, labels, index) batches from a prepared split: memory stays flat."""
    pf = open_parquet(path, "prepare")
    h, w, c = _image_shape(path, pf.schema_arrow)
    for batch in pf.iter_batches(batch_size=batch_size):
        pixels = batch.column("pixels").flatten().to_numpy(zero_copy_only=False)
        yield pixels.reshape(len(batch), h, w, c), labels_to_numpy(batch.column("label")), batch.column("index").to_numpy()
