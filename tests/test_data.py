import gzip
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vqprior.data import sources
from vqprior.data.clean import CleanReport, carve_val, drop_duplicates, subset
from vqprior.data.images import iter_image_batches, read_images, to_model_input, to_uint8, write_images
from vqprior.data.sources import DataError, RawSplit, load_fashion_mnist, locate_fashion_mnist, read_idx


def write_idx(path, array, gz=True):
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(body)


def make_fashion_folder(folder, n_train=40, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n).astype(np.uint8))
    return folder


def test_read_idx_round_trip_and_truncation(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    b = np.array([1, -2, 300], dtype=np.int32)
    write_idx(tmp_path / "b", b, gz=False)
    assert read_idx(tmp_path / "b").tolist() == [1, -2, 300]
    raw = gzip.open(tmp_path / "a.gz").read()
    gzip.open(tmp_path / "cut.gz", "wb").write(raw[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "junk")


def test_load_validates_labels(tmp_path):
    folder = make_fashion_folder(tmp_path / "f")
    splits = load_fashion_mnist(folder)
    assert splits["train"].images.shape == (40, 28, 28, 1) and splits["train"].images.dtype == np.uint8
    assert splits["test"].labels.shape == (10,)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.full(10, 12, dtype=np.uint8))
    with pytest.raises(DataError, match="labels must lie in 0..9"):
        load_fashion_mnist(folder)


def test_locate_prefers_configured_folder_and_names_all_tried(tmp_path, monkeypatch):
    folder = make_fashion_folder(tmp_path / "mine")
    assert locate_fashion_mnist(str(folder), download=False, download_dir=tmp_path / "dl") == folder
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(DataError) as info:
        locate_fashion_mnist(str(tmp_path / "empty"), download=False, download_dir=tmp_path / "dl")
    msg = str(info.value.code)
    assert str(tmp_path / "empty") in msg and "no-debian" in msg and "dataset-fashion-mnist" in msg


def test_duplicates_dropped_within_and_across_splits():
    img = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
    train = RawSplit(np.concatenate([img, img[:2]]), np.arange(7))
    test = RawSplit(np.concatenate([img[3:4], img[4:5] + 1]), np.array([0, 1]))
    report = CleanReport()
    out = drop_duplicates({"train": train, "test": test}, ["train", "test"], report)
    assert len(out["train"].images) == 5 and len(out["test"].images) == 1
    assert report.dropped == {"duplicate": {"train": 2}, "duplicate_of_earlier_split": {"test": 1}}
    assert report.as_dict()["dropped_total"] == 3


def test_val_split_is_seeded_and_disjoint():
    split = RawSplit(np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1), np.arange(100))
    a_train, a_val = carve_val(split, 0.2, np.random.default_rng(1))
    b_train, b_val = carve_val(split, 0.2, np.random.default_rng(1))
    assert len(a_val.labels) == 20 and len(a_train.labels) == 80
    assert np.array_equal(a_val.labels, b_val.labels)
    assert not set(a_train.labels) & set(a_val.labels)
    assert len(subset(split, 10, np.random.default_rng(0)).labels) == 10


def test_image_store_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (20, 6, 5, 1), dtype=np.uint8)
    labels = np.arange(20) % 3
    write_images(tmp_path / "s.parquet", images, labels)
    split = read_images(tmp_path / "s.parquet")
    assert np.array_equal(split.images, images) and np.array_equal(split.labels, labels)
    assert split.index.tolist() == list(range(20))
    schema = pq.read_schema(tmp_path / "s.parquet")
    assert schema.metadata[b"height"] == b"6" and schema.field("pixels").type.list_size == 30
    assert schema.field("pixels").type.value_type == pa.uint8()
    streamed = np.concatenate([b[0] for b in iter_image_batches(tmp_path / "s.parquet", 7)])
    assert np.array_equal(streamed, images)


def test_normalisation_inverts_exactly():
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = to_model_input(images)
    assert x.shape == (1, 1, 16, 16) and x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), torch.from_numpy(images).permute(0, 3, 1, 2))
