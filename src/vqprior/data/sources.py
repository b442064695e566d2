"""Raw image sources. Fashion-MNIST IDX files: configured folder, then Debian's, then a download."""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32, 0x0E: np.float64}


class DataError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"error: {message}")


@dataclass
class RawSplit:
    images: np.ndarray  # N x H x W x C, uint8
    labels: np.ndarray  # N, int64


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into an array, checking its header against its size."""
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} cannot be read ({exc}); re-install or re-download the data") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); re-download it")
    dtype, ndim = np.dtype(IDX_DTYPES[data[2]]).newbyteorder(">"), data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(body) != expected:
        raise DataError(f"{path} is truncated or padded: header says {shape}, body has {len(body)} bytes, expected {expected}")
    return np.frombuffer(body, dtype=dtype).astype(dtype.newbyteorder("="), copy=False).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).exists():
            return folder / name
    return None


def _complete(folder: Path) -> bool:
    return all(_find_idx(folder, stem) for pair in IDX_FILES.values() for stem in pair)


def locate_fashion_mnist(root: str | None, download: bool, download_dir: Path) -> Path:
    """Configured folder first, then Debian's package folder, then torchvision's download."""
    tried = []
    for folder in ([Path(root)] if root else []) + [DEBIAN_FASHION_MNIST, download_dir / "FashionMNIST" / "raw"]:
        tried.append(str(folder))
        if folder.is_dir() and _complete(folder):
            return folder
    if download:
        try:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(str(download_dir), train=train, download=True)
        except Exception as exc:  # network errors come in many types
            tried.append(f"download ({exc.__class__.__name__}: {str(exc)[:80]})")
        else:
            return download_dir / "FashionMNIST" / "raw"
    raise DataError(
        "Fashion-MNIST not found; tried " + ", ".join(tried) + ". Install Debian's 'dataset-fashion-mnist', "
        "set data.root to a folder with the four IDX files, or set data.download: true with internet access"
    )


def load_fashion_mnist(folder: Path) -> dict[str, RawSplit]:
    splits = {}
    for split, (img_stem, lbl_stem) in IDX_FILES.items():
        images = read_idx(_find_idx(folder, img_stem))
        labels = read_idx(_find_idx(folder, lbl_stem))
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{split} images must be N x H x W uint8, got {images.shape} {images.dtype}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{split}: {len(images)} images but labels of shape {labels.shape}")
        if labels.min() < 0 or labels.max() > 9:
            raise DataError(f"{split} labels must lie in 0..9, found {labels.min()}..{labels.max()}")
        splits[split] = RawSplit(images[..., None], labels.astype(np.int64))
    return splits
