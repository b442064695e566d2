import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vqprior.codes import CodeWriter, read_codes, read_meta
from small_params import SMALL_VQ
from vqprior.errors import InputError
from vqprior.models.vqvae import VQVAE

META = {"grid_height": 3, "grid_width": 2, "codebook_size": 1000, "vqvae_sha256": "ab" * 32,
        "data_sha256": {"train": "cd" * 32}, "image_shape": [12, 8, 1]}


def test_writer_and_reader_agree(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1000, (25, 3, 2))
    with CodeWriter(tmp_path / "train.parquet", "train", META) as w:
        for s in range(0, 25, 10):  # several row groups
            w.write(codes[s : s + 10], np.arange(s, min(25, s + 10)) % 10, np.arange(s, min(25, s + 10)))
    grid = read_codes(tmp_path / "train.parquet")
    assert grid.codes.dtype == np.uint16 and np.array_equal(grid.codes, codes)
    assert grid.grid == (3, 2) and grid.codebook_size == 1000
    assert grid.labels.tolist() == [i % 10 for i in range(25)] and grid.index.tolist() == list(range(25))
    assert read_meta(tmp_path / "train.parquet") == META
    f = pq.ParquetFile(tmp_path / "train.parquet")
    assert f.num_row_groups == 3
    schema = f.schema_arrow
    assert schema.field("codes").type.value_type == pa.uint16() and schema.field("codes").type.list_size == 6
    assert schema.field("split").type == pa.string() and f.read().column("split").to_pylist() == ["train"] * 25


def test_missing_labels_are_null(tmp_path):
    with CodeWriter(tmp_path / "x.parquet", "x", META) as w:
        w.write(np.zeros((2, 3, 2)), np.array([-1, 4]), np.array([0, 1]))
    assert pq.read_table(tmp_path / "x.parquet").column("label").to_pylist() == [None, 4]
    assert read_codes(tmp_path / "x.parquet").labels.tolist() == [-1, 4]


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="do not match the grid"):
        with CodeWriter(tmp_path / "y.parquet", "y", META) as w:
            w.write(np.zeros((2, 3, 2)), np.array([1, 2]), np.array([0, 1]))
            w.write(np.zeros((2, 4, 4)), np.array([1, 2]), np.array([2, 3]))
    assert not (tmp_path / "y.parquet").exists() and not list(tmp_path.iterdir())


def test_augmented_rows_come_back_tagged_and_can_be_left_out(tmp_path):
    rng = np.random.default_rng(1)
    codes, flipped = rng.integers(0, 1000, (2, 4, 3, 2))
    labels, index = np.array([3, -1, 5, 7]), np.arange(4)
    with CodeWriter(tmp_path / "train.parquet", "train", META) as w:
        w.write(codes, labels, index)
        w.write(flipped, labels, index, augmentation="hflip")
    both = read_codes(tmp_path / "train.parquet")
    assert both.augmentation.tolist() == ["none"] * 4 + ["hflip"] * 4
    assert np.array_equal(both.codes, np.concatenate([codes, flipped])) and both.index.tolist() == [0, 1, 2, 3] * 2
    assert both.labels.tolist() == [3, -1, 5, 7] * 2
    originals = read_codes(tmp_path / "train.parquet", augmentations=False)
    assert np.array_equal(originals.codes, codes) and originals.augmentation.tolist() == ["none"] * 4
    assert originals.labels.tolist() == [3, -1, 5, 7] and originals.meta == META
    assert pq.read_schema(tmp_path / "train.parquet").field("augmentation").type == pa.string()


def test_file_without_augmentation_column_asks_for_a_rerun(tmp_path):
    pq.write_table(pa.table({"codes": [[1, 2]]}), tmp_path / "old.parquet")
    with pytest.raises(InputError, match="lacks the split, index, label, augmentation column"):
        read_codes(tmp_path / "old.parquet")


def test_codes_read_back_decode_like_the_encoder_output(tmp_path):
    """The extract_codes round trip on a tiny untrained VQ-VAE: Parquet keeps the codes, flipped rows included."""
    torch.manual_seed(0)
    model = VQVAE(SMALL_VQ.model_copy(update={"channels": 8, "res_blocks": 0, "codebook_size": 300, "code_dim": 4})).eval()
    x = torch.rand(5, 1, 12, 8) * 2 - 1
    meta = {**META, "codebook_size": 300}
    with torch.no_grad(), CodeWriter(tmp_path / "train.parquet", "train", meta) as w:
        for tag, view in (("none", x), ("hflip", x.flip(-1))):
            w.write(model.encode(view).numpy(), np.arange(5), np.arange(5), augmentation=tag)
    grid = read_codes(tmp_path / "train.parquet")
    stored = torch.from_numpy(grid.codes.astype(np.int64))
    with torch.no_grad():
        assert torch.equal(model.decode(stored[:5]), model.decode(model.encode(x)))
        assert torch.equal(model.decode(stored[5:]), model.decode(model.encode(x.flip(-1))))
    assert grid.codes.max() >= 256  # uint16 keeps codes past a byte
