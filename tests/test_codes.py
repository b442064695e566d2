import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vqprior.codes import CodeWriter, read_codes, read_meta

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
