"""The model registry on a real MLflow store (SQLite): evaluate's registration of the generator, and `promote`,
which moves the champion alias only to a version with a better FID under the same protocol."""
import hashlib
import json
import shutil
import sys

import mlflow
import numpy as np
import pytest
import yaml

from conftest import ROOT, params_with, run
from stages import _registry, promote
from stages._tracking import dvc_md5, tracked_run
from vqprior.config import load_params

PROTOCOL = {"feature_extractor": "inception-v3-tf-2015-12-05", "feature_layer": "2048",
            "resize": "bilinear to 299x299, TF1-compatible (torch-fidelity)", "reference_split": "test",
            "num_samples": 200, "num_reference": 200, "prc_neighborhood": 3}
NAME = "vqprior-generator"
CODE = {"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}  # the project's code, run in a folder without it


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with the project's dvc.yaml, a pair of model files, reference features and its own MLflow store."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_with()))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "models").mkdir()
    (tmp_path / "data/reference").mkdir(parents=True)
    np.save(tmp_path / "data/reference/test_features.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    return tmp_path


def register(project, fid: float, models: bytes = b"", **protocol) -> str:
    """One evaluate run that registers the models now in models/ with these scores."""
    (project / "models/vqvae.pt").write_bytes(b"vqvae" + models)
    (project / "models/prior.pt").write_bytes(b"prior" + models)
    metrics = {"fid": fid, "precision": 0.6, "recall": 0.5} | PROTOCOL | protocol
    with tracked_run("evaluate", load_params()) as stage_run:
        return _registry.register_generator(stage_run, "vqprior", metrics)


def test_evaluate_registers_the_generator_with_its_hashes_scores_and_protocol(project):
    version = register(project, 30.5, models=b"-first")
    assert version == "1"
    client = mlflow.MlflowClient()
    (mv,) = client.search_model_versions(f"name = '{NAME}'")
    assert float(mv.tags["fid"]) == 30.5 and float(mv.tags["recall"]) == 0.5
    assert mv.tags["dvc.md5.models/prior.pt"] == hashlib.md5(b"prior-first").hexdigest()
    assert mv.tags["dvc.md5.models/vqvae.pt"] == hashlib.md5(b"vqvae-first").hexdigest()
    proto = json.loads(mv.tags["protocol.json"])
    assert proto == PROTOCOL | {"reference_features": dvc_md5("data/reference/test_features.npy")}
    assert mv.tags["protocol"] == _registry.protocol_id(proto)
    # the version's files are the models it was scored with, downloaded back through the store
    evaluate_run = client.get_run(mv.run_id)
    assert evaluate_run.data.tags["dvc.stage"] == "evaluate" and mv.source == f"runs:/{mv.run_id}/generator"
    mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(project / "download"))
    assert {p.name: p.read_bytes() for p in (project / "download").rglob("*.pt")} == {
        "prior.pt": b"prior-first", "vqvae.pt": b"vqvae-first"}
    # the stage run itself names the DVC hashes of what it read (the models, the reference features)
    assert evaluate_run.data.tags["dvc.dep.models/prior.pt"] == hashlib.md5(b"prior-first").hexdigest()
    assert evaluate_run.data.tags["dvc.dep.data/reference"].endswith(".dir")


def test_promote_moves_the_champion_only_to_a_better_fid_under_the_same_protocol(project):
    alias = lambda: str(mlflow.MlflowClient().get_registered_model(NAME).aliases.get("champion"))
    register(project, 30.0, b"1")
    assert "is now champion (the first)" in promote.promote(NAME, "champion", None)
    register(project, 25.0, b"2")
    assert promote.promote(NAME, "champion", None) == f"{NAME} version 2 (FID 25.000) is now champion (was version 1, FID 30.000)"
    assert alias() == "2"
    register(project, 28.0, b"3")  # worse: refused, the champion stays
    with pytest.raises(promote.NotPromoted, match=r"version 3 not promoted to champion: its FID 28.000 is not below the champion's 25.000"):
        promote.promote(NAME, "champion", None)
    register(project, 25.0, b"4")  # equal is not better
    with pytest.raises(promote.NotPromoted, match="not below"):
        promote.promote(NAME, "champion", "4")
    register(project, 5.0, b"5", num_samples=50)  # a far lower FID, but from 50 samples: not comparable
    with pytest.raises(promote.NotPromoted, match=r"FIDs of different protocols do not compare \(num_samples: 50 vs 200\)"):
        promote.promote(NAME, "champion", None)
    assert alias() == "2"
    assert promote.promote(NAME, "champion", "2") == f"{NAME} version 2 is already champion"
    with pytest.raises(promote.NotPromoted, match="has no version 9"):
        promote.promote(NAME, "champion", "9")


def test_promote_command_says_one_line_and_exits_by_the_outcome(project):
    register(project, 30.0, b"1")
    register(project, 31.0, b"2")
    first = run([sys.executable, "-m", "stages.promote", "--version", "1"], project,
                env=CODE | {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"})
    assert first.returncode == 0 and first.stdout.strip() == f"{NAME} version 1 (FID 30.000) is now champion (the first)", first.stderr[-2000:]
    worse = run([sys.executable, "-m", "stages.promote"], project,
                env=CODE | {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"})
    assert worse.returncode == 1 and worse.stdout == ""
    assert worse.stderr.strip().splitlines() == [f"error: {NAME} version 2 not promoted to champion: its FID 31.000 "
                                                 "is not below the champion's 30.000 (version 1 stays champion)"]
