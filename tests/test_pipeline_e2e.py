"""The whole DAG on the smoke profile, as a user runs it: dvc repro, outputs, MLflow runs, then a no-op re-run."""
import json
import sys

import mlflow
import numpy as np
import pyarrow.parquet as pq

from conftest import run

STAGES = ["prepare", "reference", "train_vqvae", "reconstruction_fid", "extract_codes", "train_prior", "sample",
          "evaluate"]


def test_smoke_dag_end_to_end(smoke_repo):
    first = run([sys.executable, "-m", "dvc", "repro"], smoke_repo)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout

    # outputs of every stage
    for split in ("train", "val", "test"):
        assert pq.read_metadata(smoke_repo / f"data/prepared/{split}.parquet").num_rows > 0
        codes = pq.read_table(smoke_repo / f"data/codes/{split}.parquet")
        assert codes.schema.field("codes").type.list_size == 49
    stats = json.loads((smoke_repo / "data/prepared/stats.json").read_text())
    assert stats["counts"] == {"train": 2700, "val": 300, "test": 500} and stats["image_shape"] == [28, 28, 1]
    images = np.load(smoke_repo / "data/samples/images.npy")
    assert images.shape == (200, 1, 28, 28) and images.dtype == np.uint8 and images.std() > 10
    for split in ("test", "train"):  # the real sets' Inception features, extracted once by `reference`
        feats = np.load(smoke_repo / f"data/reference/{split}_features.npy")
        assert feats.shape == (200, 2048) and feats.dtype == np.float32
    for png in ("prepare_examples", "vqvae_reconstructions", "samples"):
        assert (smoke_repo / f"reports/{png}.png").stat().st_size > 1000

    metrics = {s: json.loads((smoke_repo / f"metrics/{s}.json").read_text())
               for s in ("prepare", "reference", "train_vqvae", "reconstruction", "extract_codes", "train_prior",
                         "sample", "evaluate")}
    assert metrics["prepare"] == {"train_images": 2700, "val_images": 300, "test_images": 500, "dropped_total": 0}
    assert len(list((smoke_repo / "reports/vqvae_epochs").glob("epoch_*.png"))) == 3
    assert metrics["train_vqvae"]["test_mse"] < 0.05 and metrics["train_vqvae"]["epochs"] == 3
    assert metrics["extract_codes"]["images"] == 3500
    assert 0 < metrics["train_prior"]["val_nll"] < np.log(64)  # better than uniform over 64 codes
    ev = metrics["evaluate"]
    assert {"fid", "precision", "recall", "num_samples", "num_reference", "feature_extractor"} <= ev.keys()
    assert ev["num_samples"] == 200 and ev["num_reference"] == 200
    assert 0 < ev["fid"] < 400 and 0 <= ev["precision"] <= 1 and 0 <= ev["recall"] <= 1
    assert "inception" in ev["feature_extractor"]
    ref, rec = metrics["reference"], metrics["reconstruction"]
    assert ref["num_reference"] == ref["num_train"] == 200 and rec["num_images"] == 200
    assert 0 < ref["floor_fid"] < rec["rfid"] < 400  # real vs real beats the VQ-VAE's reconstructions
    assert 0 <= ref["floor_precision"] <= 1 and 0 <= rec["rprecision"] <= 1 and 0 <= rec["rrecall"] <= 1
    assert ev["floor_fid"] == ref["floor_fid"] and ev["rfid"] == rec["rfid"]  # copied beside the FID
    assert {"kid", "seconds", "images_per_second"} <= ev.keys() and ev["images_per_second"] > 0

    # one MLflow run per stage, with params and metrics
    mlflow.set_tracking_uri(f"sqlite:///{smoke_repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["vqprior"])
    assert sorted(runs["tags.mlflow.runName"]) == sorted(STAGES)
    by_stage = runs.set_index("tags.mlflow.runName")
    assert by_stage.loc["train_vqvae", "params.train_vqvae.model.codebook_size"] == "64"
    assert by_stage.loc["evaluate", "metrics.fid"] == ev["fid"]
    assert by_stage.loc["reference", "metrics.floor_fid"] == ref["floor_fid"]
    assert by_stage.loc["reconstruction_fid", "metrics.rfid"] == rec["rfid"]
    assert (by_stage["status"] == "FINISHED").all()

    # nothing changed: the second repro runs no stage and logs no run
    second = run([sys.executable, "-m", "dvc", "repro"], smoke_repo)
    assert second.returncode == 0
    assert "Running stage" not in second.stdout
    assert len(mlflow.search_runs(experiment_names=["vqprior"])) == len(STAGES)
    shown = run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], smoke_repo)
    assert shown.returncode == 0 and "fid" in shown.stdout
