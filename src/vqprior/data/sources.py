"""Array data sets (Fashion-MNIST and MNIST as IDX, CIFAR-10 python batches, STL-10 binary): found in data.root, then
Debian's package folder, then a torchvision download when allowed. Folders of image files are in folder.py."""
from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError  # re-exported: sources are where most data errors arise

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32, 0x0E: np.float64}


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


def load_idx_dataset(folder: Path) -> dict[str, RawSplit]:
    """MNIST-style IDX files (Fashion-MNIST, MNIST): train and test, 10 classes."""
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


CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def load_cifar10(folder: Path) -> dict[str, RawSplit]:
    """CIFAR-10's python batches (cifar-10-batches-py): rows of 3072 bytes, the red plane, then green, then blue."""
    splits = {}
    for split, names in CIFAR_BATCHES.items():
        images, labels = [], []
        for name in names:
            try:
                with open(folder / name, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
                data, batch_labels = np.asarray(batch[b"data"], dtype=np.uint8), batch[b"labels"]
            except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{folder / name} is not a readable CIFAR-10 batch ({exc.__class__.__name__}); "
                                "re-download cifar-10-python.tar.gz") from None
            if data.ndim != 2 or data.shape[1] != 3072 or len(batch_labels) != len(data):
                raise DataError(f"{folder / name}: expected N x 3072 pixels and N labels, got {data.shape}")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch_labels, dtype=np.int64))
        splits[split] = RawSplit(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))
    return splits


def load_stl10(folder: Path) -> dict[str, RawSplit]:
    """STL-10's binary files (stl10_binary): 96x96x3 images stored column-major per channel, labels 1..10."""
    splits = {}
    for split in ("train", "test"):
        x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
        x, y = np.fromfile(x_path, dtype=np.uint8), np.fromfile(y_path, dtype=np.uint8)
        if x.size % (3 * 96 * 96) or x.size // (3 * 96 * 96) != y.size:
            raise DataError(f"{x_path} holds {x.size} bytes for {y.size} labels (96x96x3 each); re-download STL-10")
        images = x.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)  # stored as channel, column, row
        splits[split] = RawSplit(np.ascontiguousarray(images), y.astype(np.int64) - 1)
    return splits


@dataclass(frozen=True)
class ArraySource:
    """Where a known data set's files live and how to read them."""

    files: tuple[str, ...]  # what a folder must hold to count as a copy
    debian: Path | None  # Debian's package folder, if there is a package
    download_subdir: str  # where torchvision's download puts the files, under the download folder
    torchvision: str  # torchvision.datasets class that downloads it
    hint: str  # how to get the data by hand
    load: Callable[[Path], dict[str, RawSplit]]

    def complete(self, folder: Path) -> bool:
        return folder.is_dir() and all(
            (folder / f).exists() or _find_idx(folder, f) for f in self.files)


_IDX_STEMS = tuple(stem for pair in IDX_FILES.values() for stem in pair)
ARRAY_SOURCES = {
    "fashion_mnist": ArraySource(_IDX_STEMS, DEBIAN_FASHION_MNIST, "FashionMNIST/raw", "FashionMNIST",
                                 "install Debian's 'dataset-fashion-mnist', or set data.root to a folder with the four IDX files",
                                 load_idx_dataset),
    "mnist": ArraySource(_IDX_STEMS, None, "MNIST/raw", "MNIST",
                         "set data.root to a folder with MNIST's four IDX files", load_idx_dataset),
    "cifar10": ArraySource(tuple(CIFAR_BATCHES["train"] + CIFAR_BATCHES["test"]), None, "cifar-10-batches-py",
                           "CIFAR10", "set data.root to the unpacked cifar-10-batches-py folder", load_cifar10),
    "stl10": ArraySource(("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"), None, "stl10_binary", "STL10",
                         "set data.root to the unpacked stl10_binary folder", load_stl10),
}


def _download(source: str, spec: ArraySource, download_dir: Path) -> None:
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.torchvision)
    if source == "stl10":
        cls(str(download_dir), split="train", download=True)  # fetches the archive holding both splits
    else:
        for train in (True, False):
            cls(str(download_dir), train=train, download=True)


def locate(source: str, root: str | None, download: bool, download_dir: Path) -> Path:
    """The folder holding `source`: data.root first, then Debian's package folder, then an earlier or new download."""
    spec = ARRAY_SOURCES[source]
    tried = []
    candidates = ([Path(root)] if root else []) + ([spec.debian] if spec.debian else []) + [download_dir / spec.download_subdir]
    for folder in candidates:
        tried.append(str(folder))
        if spec.complete(folder):
            return folder
    if download:
        try:
            _download(source, spec, download_dir)
        except Exception as exc:  # network errors come in many types
            tried.append(f"download ({exc.__class__.__name__}: {str(exc)[:80]})")
        else:
            return download_dir / spec.download_subdir
    raise DataError(f"{source} not found; tried " + ", ".join(tried) + f". To get it: {spec.hint}, "
                    "or set data.download: true with internet access")
