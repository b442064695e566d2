"""Data-parallel training (compute.procs): 2 gloo ranks on 127.0.0.1 train to the weights and codebook of one process
with the same global batch; only rank 0 writes; the stage under `dvc repro` runs as 2 processes, and one killed with
SIGKILL resumes to the weights of an uninterrupted run (that test lives with the one-process one in
test_stage_resume.py)."""
import json
import os
import socket
import sqlite3
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from conftest import DVC, copy_repo, require_fashion_mnist, run
from small_params import SMALL_PRIOR, SMALL_VQ, cpu
from stages.train_prior import evaluate_prior
from stages.train_vqvae import evaluate_vqvae
from vqprior import distributed
from vqprior.config import TrainParams
from vqprior.models.prior import Prior
from vqprior.models.vqvae import VQVAE
from vqprior.runtime import resolve_runtime, seed_everything
from vqprior.training import TrainingDiverged, fit

# a few steps (4 per epoch), no dropout or flips: every random draw is one process's, so the runs can be compared
P = TrainParams(epochs=2, batch_size=24, lr=0.002, weight_decay=0.0, warmup_steps=2, grad_clip=1.0, patience=10)
TRAIN, VAL = 96, 30  # 30 validation items split 15/15: each counted once


def vq_data() -> torch.Tensor:
    """Three flat grey levels plus faint noise: few distinct encoder outputs, so codes of a 64-code book fall unused
    and get restarted."""
    g = torch.Generator().manual_seed(0)
    levels = torch.tensor([0.2, 0.5, 0.8])[torch.arange(TRAIN + VAL) % 3]
    return levels[:, None, None, None] + 0.01 * torch.randn(TRAIN + VAL, 1, 28, 28, generator=g)


def train(kind: str, checkpoint: Path) -> dict:
    """The model's weights, its history and (VQ-VAE) its dead-code restarts after `fit`, in whatever world this is;
    kind vqvae, prior (AdamW) or prior_muon."""
    runtime = resolve_runtime(cpu())
    seed_everything(0)
    if kind == "vqvae":
        x = vq_data()
        model = VQVAE(SMALL_VQ.model_copy(update={"codebook_size": 64, "dead_code_steps": 2}))
        x_train, x_val = x[:TRAIN], x[TRAIN:]

        def step(idx):
            loss, stats, _ = model.loss(x_train[idx])
            return loss, stats

        evaluate, monitor = (lambda: evaluate_vqvae(model, x_val, 8, runtime)), "mse"
    else:
        codes = torch.randint(0, 16, (TRAIN + VAL, 49), generator=torch.Generator().manual_seed(0))
        codes[:, 1::2] = codes[:, ::2][:, :24]  # something to learn: every odd token repeats its left neighbour
        model = Prior(SMALL_PRIOR, vocab=16, length=49)
        c_train, c_val = codes[:TRAIN], codes[TRAIN:]

        def step(idx):
            return model.loss(c_train[idx])

        evaluate, monitor = (lambda: evaluate_prior(model, c_val, None, 8, runtime.device)), "nll"
    result = fit(model, TRAIN, step, evaluate, P, runtime, seed=3, checkpoint=checkpoint, monitor=monitor,
                 fingerprint="test", optimizer="muon" if kind == "prior_muon" else "adamw")
    restarts = model.quantizer.restarts if kind == "vqvae" else 0
    return {"state": model.state_dict(), "history": result.history, "restarts": restarts}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, kind: str, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    assert distributed.start("unused", cpu(procs=world)) is None  # joins the group as this rank
    assert (distributed.rank(), distributed.world()) == (rank, world)
    result = train(kind, out / f"checkpoint_rank{rank}.pt")  # a rank that wrote would leave its own file
    torch.save(result, out / f"result_rank{rank}.pt")
    distributed.finish()


def two_ranks(kind: str, out: Path) -> list[dict]:
    mp.spawn(_rank, args=(2, free_port(), kind, out), nprocs=2, join=True)
    return [torch.load(out / f"result_rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("kind", ["vqvae", "prior", "prior_muon"])
def test_two_ranks_train_what_one_process_trains(kind, tmp_path):
    one = train(kind, tmp_path / "one.pt")
    ranks = two_ranks(kind, tmp_path)
    for name, value in one["state"].items():
        # the ranks step on identical gradients and codebook statistics: they hold the very same weights
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        # and those of one process, up to the order floats were summed in
        if value.is_floating_point():
            assert torch.allclose(ranks[0]["state"][name], value, atol=1e-5, rtol=1e-4), \
                f"{name}: max difference {(ranks[0]['state'][name] - value).abs().max():.2e}"
        else:
            assert torch.equal(ranks[0]["state"][name], value), name
    for mine, theirs in zip(one["history"], ranks[0]["history"]):  # the loss and validation of the whole batch / set
        for key in ("train_" + ("mse" if kind == "vqvae" else "nll"), "val_" + ("mse" if kind == "vqvae" else "nll")):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4), key
    if kind == "vqvae":
        assert one["restarts"] > 0  # the dead-code path ran, and chose the same codes on both ranks
        assert ranks[0]["restarts"] == one["restarts"]
        assert ranks[0]["history"][-1]["val_perplexity"] == pytest.approx(one["history"][-1]["val_perplexity"], rel=1e-4)
    assert (tmp_path / "checkpoint_rank0.pt").exists() and not (tmp_path / "checkpoint_rank1.pt").exists()


def _nan_rank(rank: int, port: int, out: Path) -> None:
    """A toy fit whose loss turns NaN on rank 1's share alone, at the 6th step (epoch 2 of 4-step epochs)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    distributed.start("unused", cpu(procs=2))
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    model, steps = torch.nn.Linear(4, 1), [0]

    def step(idx):
        steps[0] += 1
        loss = model(x[idx]).pow(2).mean()
        return (loss * float("nan") if rank == 1 and steps[0] == 6 else loss), {}

    try:
        fit(model, 64, step, lambda: {"loss": 0.0}, P.model_copy(update={"batch_size": 16}), resolve_runtime(cpu()),
            seed=0, checkpoint=out / "checkpoint.pt", monitor="loss", fingerprint="nan")
    except TrainingDiverged as stop:
        (out / f"stop_rank{rank}.txt").write_text(str(stop))
    distributed.finish()


def test_a_nan_on_one_rank_stops_every_rank_with_the_same_line(tmp_path):
    mp.spawn(_nan_rank, args=(free_port(), tmp_path), nprocs=2, join=True)
    lines = [(tmp_path / f"stop_rank{r}.txt").read_text() for r in range(2)]
    assert lines[0] == lines[1]  # the whole batch's loss is NaN on both: no rank trains on while another stopped
    assert lines[0].startswith("train: loss is nan at epoch 2, step 1;")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1  # the last good epoch's, kept


def test_shares_tile_a_batch_in_rank_order(monkeypatch):
    for world in (2, 3):
        for n in (1, 7, 30):
            parts = []
            for rank in range(world):
                monkeypatch.setattr(distributed, "world", lambda: world)
                monkeypatch.setattr(distributed, "rank", lambda: rank)
                parts.extend(range(n)[distributed.share(n)])
            assert parts == list(range(n)), (world, n)  # each item once, none padded, the one-process order


def two_process_repo(dest: Path) -> Path:
    require_fashion_mnist()
    repo = copy_repo(dest)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["compute"] |= {"procs": 2, "precision": "fp32"}
    params["train_vqvae"]["hflip"] = True  # each rank draws its own flips
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    return repo


def test_training_stages_under_dvc_repro_run_as_two_processes_and_rank_0_reports(tmp_path):
    repo = two_process_repo(tmp_path / "repo")
    done = run([*DVC, "repro", "train_prior", "train_classifier"], repo)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stages = ("train_vqvae", "train_classifier", "train_prior")
    for stage in stages:
        assert f"{stage}: 2 processes (compute.procs), 1 threads each" in done.stdout
        assert done.stdout.count(f"{stage} epoch 1/") == 1  # rank 0 alone prints
    with sqlite3.connect(repo / "mlflow.db") as db:
        runs = db.execute("SELECT name, status, run_uuid FROM runs").fetchall()
        assert sorted(name for name, _, _ in runs if name in stages) == sorted(stages)  # one run each: rank 0's
        assert {status for _, status, _ in runs} == {"FINISHED"}
        for stage, key in (("train_vqvae", "test_mse"), ("train_prior", "val_nll"), ("train_classifier", "test_accuracy")):
            uuid = next(u for name, _, u in runs if name == stage)
            logged = db.execute("SELECT value FROM latest_metrics WHERE run_uuid = ? AND key = ?", (uuid, key)).fetchone()
            reported = json.loads((repo / f"reports/{stage}_detail.json").read_text())[key]
            assert logged[0] == pytest.approx(reported, rel=1e-9), stage  # the file and the run: rank 0's numbers
    status = run([*DVC, "status", "train_prior", "train_classifier"], repo)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    assert not list((repo / "checkpoints").glob("*.pt"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_stages_on_gpus_in_bf16(tmp_path):
    """The CUDA path: bf16 autocast, channels-last, and with two GPUs or more two NCCL ranks."""
    require_fashion_mnist()
    repo = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["compute"] |= {"device": "cuda", "precision": "auto", "procs": min(2, torch.cuda.device_count())}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    done = run([*DVC, "repro", "train_prior", "train_classifier"], repo)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in ("train_vqvae", "train_classifier", "train_prior"):
        report = json.loads((repo / f"reports/{stage}_detail.json").read_text())
        assert (report["device"], report["precision"]) == ("cuda", "bf16"), stage
