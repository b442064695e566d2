"""DVC for a team: what one clone ran, another pulls through the remote and does not run again; queued experiments run two at a time and land in the project's MLflow store under their names."""
import json
import os
import sqlite3
import subprocess
import sys

import pytest
import yaml

from conftest import DVC, GIT_ENV, ROOT, copy_repo, require_fashion_mnist, run, run_dvc_queue, run_ok, stages_run
from test_faults import tiny_params


def dvc(repo, *args) -> subprocess.CompletedProcess:
    return run_ok([*DVC, *args], repo)


def test_the_project_has_a_default_remote_beside_it():
    config = run([*DVC, "remote", "default"], ROOT)
    assert config.stdout.strip() == "storage"
    url = run([*DVC, "remote", "list"], ROOT).stdout.split()
    assert url[:2] == ["storage", str(ROOT.parent / "vqprior-dvc-remote")]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A clone that ran the DAG up to train_prior (tiny params) and committed dvc.lock, with a remote of its own."""
    require_fashion_mnist()
    base = tmp_path_factory.mktemp("team")
    repo = copy_repo(base / "first")
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    dvc(repo, "remote", "modify", "--local", "storage", "url", str(base / "remote"))
    assert stages_run(dvc(repo, "repro", "train_prior")) == ["prepare", "train_vqvae", "extract_codes", "train_prior"]
    env = {**os.environ, **GIT_ENV}
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "ran"], cwd=repo, check=True, env=env)
    return repo


def clone(first, dest):
    """A git clone of `first`, on the same remote."""
    subprocess.run(["git", "clone", "-q", str(first), str(dest)], check=True, env={**os.environ, **GIT_ENV})
    dvc(dest, "remote", "modify", "--local", "storage", "url", str(first.parent / "remote"))
    return dest


def test_a_second_clone_pulls_the_outputs_and_runs_nothing(first, tmp_path):
    dvc(first, "push", "--run-cache")
    second = clone(first, tmp_path / "second")
    dvc(second, "pull", "--run-cache", "--with-deps", "train_prior")
    assert "Data and pipelines are up to date." in dvc(second, "status", "train_prior").stdout
    assert stages_run(dvc(second, "repro", "train_prior")) == []
    assert (second / "models/prior.pt").read_bytes() == (first / "models/prior.pt").read_bytes()


@pytest.fixture(scope="module")
def queued(first):
    """Two experiments queued in `first` and run two at a time: {name: train_prior's lr}."""
    lrs = {"lr-low": 0.0005, "lr-high": 0.004}
    for name, lr in lrs.items():
        dvc(first, "exp", "run", "--queue", "-n", name, "-S", f"train_prior.train.lr={lr}", "train_prior")
    status = run_dvc_queue(first)
    assert status.count("Success") == 2, status
    return lrs


def test_queued_experiments_run_two_at_a_time_into_the_projects_mlflow_store(first, queued):
    """`dvc exp run --queue` + `dvc queue start -j 2`: each runs in a temporary copy under .dvc/tmp/exps, and its
    stage runs land in the project's own mlflow.db (DVC_ROOT), tagged with the experiment's name."""
    with sqlite3.connect(first / "mlflow.db") as db:
        rows = db.execute("SELECT r.name, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                          "WHERE t.key = 'dvc.exp' AND t.value != ''").fetchall()
    assert sorted(rows) == [("train_prior", "lr-high"), ("train_prior", "lr-low")]
    assert not list((first / ".dvc/tmp").rglob("mlflow.db"))  # nothing written into the temporary copies
    assert {"lr-low", "lr-high"} <= set(experiment_metrics(first))


def experiment_metrics(repo) -> dict[str, dict]:
    """`dvc exp show`'s experiments: {name: metrics/train_prior.json's values}."""
    shown = yaml.safe_load(dvc(repo, "exp", "show", "--json").stdout)
    return {e["name"]: e["revs"][0]["data"]["metrics"]["metrics/train_prior.json"]["data"]
            for row in shown for e in (row.get("experiments") or [])}


def test_another_clone_restores_an_experiment_from_the_run_cache_instead_of_running_it(first, queued, tmp_path):
    """An experiment one clone ran (and never committed) is a run-cache record: after `make push` (stages.push_runs),
    a clone that sets the same params pulls the records and `dvc repro --pull` restores train_prior's model, detail
    report and git-tracked metrics instead of training."""
    run_ok([sys.executable, "-m", "stages.push_runs"], first)
    second = clone(first, tmp_path / "second")
    dvc(second, "pull", "--run-cache", "--with-deps", "train_prior")
    params = yaml.safe_load((second / "params.yaml").read_text())
    params["train_prior"]["train"]["lr"] = queued["lr-high"]
    (second / "params.yaml").write_text(yaml.safe_dump(params))
    done = dvc(second, "repro", "--pull", "train_prior")
    assert stages_run(done) == [], done.stdout
    assert "Stage 'train_prior' is cached - skipping run" in done.stdout
    restored = json.loads((second / "metrics/train_prior.json").read_text())
    assert restored == pytest.approx(experiment_metrics(first)["lr-high"])
    assert json.loads((second / "reports/train_prior_detail.json").read_text())["val_nll"] == pytest.approx(
        restored["nll"])
    assert "Data and pipelines are up to date." in dvc(second, "status", "train_prior").stdout
