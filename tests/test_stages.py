"""Stages run as their own processes: they fail fast and clearly on bad input; train_prior learns augmentation tags."""
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, run
from vqprior.codes import CodeWriter
from vqprior.models.prior import load_prior


def stage(name, cwd):
    return run([sys.executable, "-m", f"stages.{name}"], cwd, env={"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}, timeout=120)


def test_bad_param_stops_the_stage_with_one_line(tmp_path):
    params = yaml.safe_load((ROOT / "profiles/smoke.yaml").read_text())
    params["train_vqvae"]["train"]["lr"] = -0.1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = stage("train_vqvae", tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train_vqvae.train.lr" in lines[0] and "greater than 0" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()  # stopped before tracking or any work


@pytest.mark.parametrize("name, message", [
    ("train_prior", "error: data/codes/train.parquet not found; run `dvc repro extract_codes` first"),
    ("analyse_prior", "error: models/prior.pt not found; run `dvc repro train_prior` first"),
])
def test_missing_input_names_the_stage_to_run(tmp_path, name, message):
    (tmp_path / "params.yaml").write_text((ROOT / "profiles/smoke.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    result = stage(name, tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == message


def test_prior_trains_on_flipped_rows_under_their_own_tag(tmp_path):
    """A code store with 'hflip' rows gives a prior that tells them apart by a tag; untagged (sampling) is original."""
    params = yaml.safe_load((ROOT / "profiles/smoke.yaml").read_text())
    params["train_prior"]["train"].update(epochs=15, lr=0.01, warmup_steps=5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())  # MLflow tracking reads the stage's deps
    meta = {"grid_height": 2, "grid_width": 3, "codebook_size": 8, "image_shape": [8, 12, 1],
            "vqvae_sha256": "0" * 64, "data_sha256": "0" * 64}
    labels = np.arange(40) % 10
    for split, tags in (("train", ["none", "hflip"]), ("val", ["none"])):
        with CodeWriter(tmp_path / f"data/codes/{split}.parquet", split, {**meta, "augmentations": tags}) as w:
            for tag in tags:  # originals are all code 1, their flips all code 5
                w.write(np.full((40, 2, 3), 5 if tag == "hflip" else 1), labels, np.arange(40), augmentation=tag)
    result = stage("train_prior", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "80 grids (40 flipped)" in result.stdout
    prior, _ = load_prior(tmp_path / "models/prior.pt")
    assert prior.augmentations == 2
    start = prior.with_start(torch.zeros(2, 6, dtype=torch.long))[:, :1]
    with torch.no_grad():
        untagged, _ = prior(start, labels=torch.tensor([3, 3]))
        tagged, _ = prior(start, labels=torch.tensor([3, 3]), augmentation=torch.tensor([0, 1]))
    # the first code has nothing but the tag to go on: original -> 1, flipped -> 5; no tag means original
    assert tagged[:, 0].argmax(-1).tolist() == [1, 5] and untagged[:, 0].argmax(-1).tolist() == [1, 1]


@pytest.mark.parametrize("labels, message", [
    (np.full(40, -1), "error: train_prior.model.num_classes is 10 but the codes carry no labels; set it to 0 for an "
                      "unconditional prior"),
    (np.arange(40) % 3, "error: train_prior.model.num_classes is 10 but the codes hold labels 0..2; set it to 3, or 0 "
                        "for an unconditional prior"),
])
def test_conditional_prior_needs_every_class_in_the_codes(tmp_path, labels, message):
    """Sampling draws each of num_classes classes: one the prior never saw would give untrained samples."""
    (tmp_path / "params.yaml").write_text((ROOT / "profiles/smoke.yaml").read_text())  # num_classes: 10
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    meta = {"grid_height": 2, "grid_width": 3, "codebook_size": 8, "image_shape": [8, 12, 1],
            "vqvae_sha256": "0" * 64, "data_sha256": "0" * 64, "augmentations": ["none"]}
    for split in ("train", "val"):
        with CodeWriter(tmp_path / f"data/codes/{split}.parquet", split, meta) as w:
            w.write(np.ones((40, 2, 3)), labels, np.arange(40))
    result = stage("train_prior", tmp_path)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == message
    assert not (tmp_path / "models/prior.pt").exists()


def test_image_side_that_does_not_halve_evenly_is_named(tmp_path):
    params = yaml.safe_load((ROOT / "profiles/smoke.yaml").read_text())
    params["train_vqvae"]["model"].update(downsamples=3, channels=64)  # 28 -> 14 -> 7 -> 3.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    assert run([sys.executable, "-m", "stages.prepare"], tmp_path, env={"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"},
               timeout=300).returncode == 0
    result = stage("train_vqvae", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("error: 28x28 images do not halve evenly 3 times "
                                                      "(train_vqvae.model.downsamples); use at most 2, or another data.image_size")
