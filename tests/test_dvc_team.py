"""DVC for a team: what one clone ran, another pulls through the remote and does not run again; queued experiments run two at a time and land in the project's MLflow store under their names."""
import os
import sqlite3
import subprocess

import pytest
import yaml

from conftest import DVC, GIT_ENV, ROOT, copy_repo, require_fashion_mnist, run, run_dvc_queue, run_ok
from test_faults import tiny_params


def dvc(repo, *args) -> subprocess.CompletedProcess:
    return run_ok([*DVC, *args], repo)


def ran(done: subprocess.CompletedProcess) -> list[str]:
    return [line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")]


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
    assert ran(dvc(repo, "repro", "train_prior")) == ["prepare", "train_vqvae", "extract_codes", "train_prior"]
    env = {**os.environ, **GIT_ENV}
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "ran"], cwd=repo, check=True, env=env)
    return repo


def test_a_second_clone_pulls_the_outputs_and_runs_nothing(first, tmp_path):
    dvc(first, "push", "--run-cache")
    remote = first.parent / "remote"
    second = tmp_path / "second"
    subprocess.run(["git", "clone", "-q", str(first), str(second)], check=True, env={**os.environ, **GIT_ENV})
    dvc(second, "remote", "modify", "--local", "storage", "url", str(remote))
    dvc(second, "pull", "--run-cache", "--with-deps", "train_prior")
    assert "Data and pipelines are up to date." in dvc(second, "status", "train_prior").stdout
    assert ran(dvc(second, "repro", "train_prior")) == []
    assert (second / "models/prior.pt").read_bytes() == (first / "models/prior.pt").read_bytes()

    # (DVC's run cache stays empty: DVC saves no run-cache entry for a stage with a `cache: false` output that is not
    # a metric or a plot, and every stage keeps its detail report in git that way; see docs/team.md)
    assert not (first / ".dvc/cache/runs").exists()


def test_queued_experiments_run_two_at_a_time_into_the_projects_mlflow_store(first):
    """`dvc exp run --queue` + `dvc queue start -j 2`: each runs in a temporary copy under .dvc/tmp/exps, and its
    stage runs land in the project's own mlflow.db (DVC_ROOT), tagged with the experiment's name."""
    for name, lr in (("lr-low", 0.0005), ("lr-high", 0.004)):
        dvc(first, "exp", "run", "--queue", "-n", name, "-S", f"train_prior.train.lr={lr}", "train_prior")
    status = run_dvc_queue(first)
    assert status.count("Success") == 2, status
    with sqlite3.connect(first / "mlflow.db") as db:
        rows = db.execute("SELECT r.name, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                          "WHERE t.key = 'dvc.exp' AND t.value != ''").fetchall()
    assert sorted(rows) == [("train_prior", "lr-high"), ("train_prior", "lr-low")]
    assert not list((first / ".dvc/tmp").rglob("mlflow.db"))  # nothing written into the temporary copies
    shown = yaml.safe_load(dvc(first, "exp", "show", "--json").stdout)
    names = {e["name"] for row in shown for e in (row.get("experiments") or [])}
    assert {"lr-low", "lr-high"} <= names
