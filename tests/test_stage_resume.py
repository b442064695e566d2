"""A stage killed mid-run under `dvc repro`, then `dvc repro` again: a trainer resumes from its last checkpoint, every
stage ends with the outputs of an uninterrupted run."""
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import DVC, copy_repo, require_fashion_mnist, run, stages_run, subprocess_env, wait_until
from test_faults import tiny_params

EPOCHS = 4


@pytest.mark.parametrize("procs", [1, 2], ids=["1-process", "2-processes"])
def test_killed_vqvae_stage_resumes_to_identical_weights(procs, tmp_path):
    """With 2 processes (compute.procs), the launcher alone is killed: its ranks must die with it, and the resumed
    ranks each draw their random flips on from where they were."""
    repo = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train_vqvae"]["train"]["epochs"] = EPOCHS
    if procs > 1:
        params["compute"] |= {"procs": procs, "precision": "fp32"}
        params["train_vqvae"]["hflip"] = True
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert run([*DVC, "repro", "prepare"], repo).returncode == 0
    stage = [sys.executable, "-m", "stages.train_vqvae"]

    uninterrupted = run(stage, repo)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    reference = torch.load(repo / "models/vqvae.pt", weights_only=False)["state_dict"]
    (repo / "models/vqvae.pt").unlink()

    # a real kill (SIGKILL, no clean-up code runs) as soon as the first epoch's checkpoint is on disk
    checkpoint = repo / "checkpoints/train_vqvae.pt"
    proc = subprocess.Popen(stage, cwd=repo, env=subprocess_env(repo), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_until(checkpoint.exists, proc, "the stage, before writing a checkpoint,")
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while True:  # nothing of the stage lives on in its process group
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the stage's ranks outlived their launcher"
        time.sleep(0.1)
    killed_after = torch.load(checkpoint, weights_only=False)["epoch"]
    assert 1 <= killed_after < EPOCHS
    assert not (repo / "models/vqvae.pt").exists()

    resumed = run([*DVC, "repro", "train_vqvae"], repo)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resuming from {checkpoint.relative_to(repo)} after epoch {killed_after}" in resumed.stdout
    final = torch.load(repo / "models/vqvae.pt", weights_only=False)["state_dict"]
    assert final.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(final[name], value), name
    assert not checkpoint.exists()  # removed once the stage finished
    # DVC deleted the stage's outputs before the resumed run; the grids of the epochs before the kill survive anyway
    grids = sorted(f.name for f in (repo / "reports/vqvae_epochs").iterdir())
    assert grids == [f"epoch_{e:03d}.png" for e in range(1, EPOCHS + 1)]


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    """A tiny project whose DAG up to `train_prior` ran once, uninterrupted, under DVC."""
    require_fashion_mnist()
    repo = copy_repo(tmp_path_factory.mktemp("killed") / "repo")
    params = tiny_params()
    params["extract_codes"]["batch_size"] = 4  # many small writes: the kill lands mid-write
    params["train_prior"]["train"] |= {"epochs": 3, "batch_size": 8}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    done = run([*DVC, "repro", "train_prior"], repo)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return repo


def _data_and_model_hashes(repo) -> dict[str, str]:
    """dvc.lock's hash of every data and model output (the report files also hold wall times, so they differ)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])
            if out["path"].startswith(("data/", "models/"))}


def _forget_outputs(repo, stage: str) -> None:
    """Drop `stage`'s outputs from DVC's cache and the run records, as if its run had never finished here (a stage is
    killed in a run DVC has not made before): otherwise the next `dvc repro` restores them from the cache instead of
    running the stage, since dvc.lock still matches (docs/faults.md)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for out in lock["stages"][stage]["outs"]:
        (repo / ".dvc/cache/files/md5" / out["md5"][:2] / out["md5"][2:]).unlink(missing_ok=True)
    shutil.rmtree(repo / ".dvc/cache/runs", ignore_errors=True)


@pytest.mark.parametrize("stage, ready", [
    ("extract_codes", lambda repo: bool(list((repo / "data/codes").glob(".*.tmp")))),  # mid-write of a code file
    ("train_prior", lambda repo: (repo / "checkpoints/train_prior.pt").exists()),  # after the first epoch
], ids=["extract_codes-mid-write", "train_prior-after-epoch-1"])
def test_sigkill_under_dvc_repro_then_dvc_repro_ends_as_uninterrupted(dvc_project, stage, ready):
    """DVC and the stage both killed (SIGKILL to the process group, as a lost worker or a closed terminal would): the
    next `dvc repro` re-runs that stage alone, to the same data and model hashes, so nothing downstream re-runs; no
    temporary, no checkpoint and no RUNNING MLflow run is left, and `dvc status` is clean."""
    repo = dvc_project
    uninterrupted = _data_and_model_hashes(repo)
    _forget_outputs(repo, stage)
    killed = subprocess.Popen([*DVC, "repro", "--force", "--single-item", stage], cwd=repo,
                              env=subprocess_env(repo), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    wait_until(lambda: ready(repo), killed, f"{stage}, before the kill,", poll=0.002)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()

    again = run([*DVC, "repro", "train_prior"], repo)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert stages_run(again) == [stage], again.stdout
    assert _data_and_model_hashes(repo) == uninterrupted
    status = run([*DVC, "status", "train_prior"], repo)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    assert not [p for p in repo.rglob(".*.tmp") if ".dvc" not in p.parts]
    assert not (repo / "checkpoints" / f"{stage}.pt").exists()
    with sqlite3.connect(repo / "mlflow.db") as db:
        statuses = [status for (status,) in db.execute("SELECT status FROM runs")]
    assert "RUNNING" not in statuses and "KILLED" in statuses  # the killed run is marked when the stage starts again
