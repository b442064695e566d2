"""A training stage killed mid-run resumes from its last checkpoint and ends with the weights of an uninterrupted run."""
import subprocess
import sys
import time

import torch
import yaml

from conftest import copy_repo, run, subprocess_env

EPOCHS = 4


def test_killed_vqvae_stage_resumes_to_identical_weights(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train_vqvae"]["train"]["epochs"] = EPOCHS
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert run([sys.executable, "-m", "dvc", "repro", "prepare"], repo).returncode == 0
    stage = [sys.executable, "-m", "stages.train_vqvae"]

    uninterrupted = run(stage, repo)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    reference = torch.load(repo / "models/vqvae.pt", weights_only=False)["state_dict"]
    (repo / "models/vqvae.pt").unlink()

    # a real kill (SIGKILL, no clean-up code runs) as soon as the first epoch's checkpoint is on disk
    checkpoint = repo / "checkpoints/train_vqvae.pt"
    proc = subprocess.Popen(stage, cwd=repo, env=subprocess_env(repo), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert proc.poll() is None, "the stage ended before writing a checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    killed_after = torch.load(checkpoint, weights_only=False)["epoch"]
    assert 1 <= killed_after < EPOCHS
    assert not (repo / "models/vqvae.pt").exists()

    resumed = run([sys.executable, "-m", "dvc", "repro", "train_vqvae"], repo)
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
