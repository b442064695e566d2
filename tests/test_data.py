import dataclasses
import gzip
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vqprior.data import sources
from vqprior.data.build import Deduplicator, Job, write_splits
from vqprior.data.clean import CleanReport
from vqprior.data.folder import DecodeSpec
from vqprior.errors import InputError
from stages._cli import message as stage_line
from vqprior.data.images import Normalisation, SplitWriter, iter_image_batches, read_images, write_images
from vqprior.data.sources import ARRAY_SOURCES, DataError, load_cifar10, load_idx_dataset, load_stl10, locate, read_idx


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
    splits = load_idx_dataset(folder)
    assert splits["train"].images.shape == (40, 28, 28, 1) and splits["train"].images.dtype == np.uint8
    assert splits["test"].labels.shape == (10,)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.full(10, 12, dtype=np.uint8))
    with pytest.raises(DataError, match="labels must lie in 0..9"):
        load_idx_dataset(folder)


def test_locate_prefers_configured_folder_and_names_all_tried(tmp_path, monkeypatch):
    folder = make_fashion_folder(tmp_path / "mine")
    assert locate("fashion_mnist", str(folder), download=False, download_dir=tmp_path / "dl") == folder
    earlier_download = make_fashion_folder(tmp_path / "dl" / "MNIST" / "raw")  # no data.root: torchvision's layout
    assert locate("mnist", None, download=False, download_dir=tmp_path / "dl") == earlier_download
    no_debian = dataclasses.replace(ARRAY_SOURCES["fashion_mnist"], debian=tmp_path / "no-debian")
    monkeypatch.setitem(sources.ARRAY_SOURCES, "fashion_mnist", no_debian)
    with pytest.raises(DataError) as info:
        locate("fashion_mnist", str(tmp_path / "empty"), download=False, download_dir=tmp_path / "dl")
    msg = str(info.value)
    assert str(tmp_path / "empty") in msg and "no-debian" in msg and "dataset-fashion-mnist" in msg


def test_duplicates_dropped_within_and_across_splits(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
    train = list(img) + list(img[:2])  # two copies inside train
    test = [img[3], img[4] + 1]  # a train image again, and a new one
    jobs = [Job(f"train/{i}", i, "val" if i == 4 else "train") for i in range(7)] + [
        Job(f"test/{i}", i, "test") for i in range(2)]
    report = CleanReport()
    writers = write_splits(jobs, ((x, None) for x in train + test), DecodeSpec(size=4, channels=1), tmp_path, report,
                           Deduplicator())
    assert writers["train"].count == 4 and writers["val"].count == 1 and writers["test"].count == 1
    assert report.dropped == {"duplicate": {"train": 2}, "duplicate_of_earlier_split": {"test": 1}}
    assert report.examples == {"duplicate": ["train/5", "train/6"], "duplicate_of_earlier_split": ["test/0"]}
    assert report.as_dict()["dropped_total"] == 3


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
    x = Normalisation().to_model(images)
    assert x.shape == (1, 1, 16, 16) and x.min() == -1 and x.max() == 1
    assert torch.equal(Normalisation().to_uint8(x), torch.from_numpy(images).permute(0, 3, 1, 2))


def test_model_inputs_have_nchw_strides():
    """A permuted NHWC batch keeps NHWC strides, which torch reads as channels-last: the VQ-VAE then encoded
    channels-last, where CPU GroupNorm is ~4x slower."""
    for c in (1, 3):
        x = Normalisation().to_model(np.full((4, 8, 8, c), 255, np.uint8))
        assert x.shape == (4, c, 8, 8) and x.stride() == (c * 64, 64, 8, 1)
        assert torch.equal(x, torch.ones_like(x))  # scale: 255 -> 1


def test_standardisation_uses_train_statistics_and_inverts(tmp_path):
    rng = np.random.default_rng(0)
    images = np.stack([rng.integers(0, 100, (50, 8, 8)), rng.integers(100, 256, (50, 8, 8)),
                       rng.integers(0, 256, (50, 8, 8))], axis=-1).astype(np.uint8)
    with SplitWriter(tmp_path / "t.parquet", 8, 8, 3) as writer:
        writer.add_batch(images, np.zeros(50, dtype=np.int64))
    stats = writer.channel_stats()
    assert np.allclose(stats["mean"], images.reshape(-1, 3).mean(0) / 255) and np.allclose(stats["std"], images.reshape(-1, 3).std(0) / 255)
    norm = Normalisation.from_dict(Normalisation.from_train_stats("standardize", stats).as_dict())  # via stats.json
    x = norm.to_model(images)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    assert torch.equal(norm.to_uint8(x), torch.from_numpy(images).permute(0, 3, 1, 2))
    with pytest.raises(DataError, match="constant"):
        Normalisation.from_train_stats("standardize", {"mean": [0.5], "std": [0.0]})


def test_cifar10_batches_are_read_from_colour_planes(tmp_path):
    import pickle

    rng = np.random.default_rng(0)
    rows = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows[name] = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": rows[name], b"labels": [1, 2, 3, 9]}, f)
    splits = load_cifar10(tmp_path)
    assert splits["train"].images.shape == (20, 32, 32, 3) and splits["test"].images.shape == (4, 32, 32, 3)
    # pixel (row 5, column 7) of the test set's 3rd image, blue: the third plane of 1,024 bytes
    assert splits["test"].images[2, 5, 7, 2] == rows["test_batch"][2, 2 * 1024 + 5 * 32 + 7]
    assert splits["train"].labels.tolist() == [1, 2, 3, 9] * 5
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a readable CIFAR-10 batch"):
        load_cifar10(tmp_path)


def test_stl10_binary_is_read_column_major(tmp_path):
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8) for s, n in (("train", 3), ("test", 2))}
    for split, x in images.items():
        x.transpose(0, 3, 2, 1).tofile(tmp_path / f"{split}_X.bin")  # STL-10 stores channel, column, row
        np.arange(1, len(x) + 1, dtype=np.uint8).tofile(tmp_path / f"{split}_y.bin")  # labels 1..10 on disk
    splits = load_stl10(tmp_path)
    assert np.array_equal(splits["train"].images, images["train"]) and splits["test"].labels.tolist() == [0, 1]
    (tmp_path / "test_X.bin").write_bytes((tmp_path / "test_X.bin").read_bytes()[:-10])
    with pytest.raises(DataError, match="re-download STL-10"):
        load_stl10(tmp_path)


def test_stats_file_missing_corrupt_or_partial_names_prepare(tmp_path):
    from vqprior.data.images import load_stats
    from stages._cli import message
    with pytest.raises(InputError) as info:
        load_stats(tmp_path)
    assert message(info.value) == f"error: {tmp_path}/stats.json not found; run `dvc repro prepare` first"
    (tmp_path / "stats.json").write_text("{")
    with pytest.raises(InputError) as info:
        load_stats(tmp_path)
    assert message(info.value) == f"error: {tmp_path}/stats.json is not valid JSON; re-run `dvc repro prepare`"
    (tmp_path / "stats.json").write_text('{"sha256": {"train": "ab"}}')
    assert load_stats(tmp_path)["sha256"] == {"train": "ab"}
    with pytest.raises(InputError, match=r"stats.json lacks normalisation \(written by older code\?\)"):
        load_stats(tmp_path, needs=("normalisation", "sha256"))


def test_truncated_parquet_names_the_stage_that_writes_it(tmp_path):
    from vqprior.codes import read_codes
    from vqprior.data.images import iter_image_batches, read_images, write_images
    write_images(tmp_path / "train.parquet", np.zeros((4, 28, 28, 1), np.uint8), np.zeros(4, np.int64))
    good = (tmp_path / "train.parquet").read_bytes()
    (tmp_path / "train.parquet").write_bytes(good[: len(good) // 2])  # a copy cut short
    message = f"error: {tmp_path / 'train.parquet'} is not a readable Parquet file (ArrowInvalid); re-run `dvc repro prepare`"
    for read in (lambda p: read_images(p), lambda p: next(iter_image_batches(p, 2))):
        with pytest.raises(InputError) as info:
            read(tmp_path / "train.parquet")
        assert stage_line(info.value) == message
    (tmp_path / "codes.parquet").write_text("not parquet")
    with pytest.raises(InputError) as info:
        read_codes(tmp_path / "codes.parquet")
    assert stage_line(info.value) == (f"error: {tmp_path / 'codes.parquet'} is not a readable Parquet file "
                                      "(ArrowInvalid); re-run `dvc repro extract_codes`")


def test_example_images_are_the_seeded_pick_streamed_batch_by_batch(tmp_path):
    from stages.prepare import example_images
    from vqprior.data.images import write_images
    images = np.random.default_rng(0).integers(0, 256, (50, 4, 4, 1), dtype=np.uint8)
    write_images(tmp_path / "train.parquet", images, np.zeros(50, np.int64))
    pick = np.sort(np.random.default_rng(7).choice(50, size=20, replace=False))
    assert np.array_equal(example_images(tmp_path / "train.parquet", 7, n=20, batch_size=3), images[pick])
    assert len(example_images(tmp_path / "train.parquet", 7)) == 50  # a split under 64 images: all of them
