"""Data-parallel training (compute.procs) against one process, side by side in one run: the same steps of the same
global batches at params.yaml's model sizes, in fp32 with nothing random in a step (no flips, dropout or
usage-entropy sample), so the two must end with the same weights up to the order floats were summed in.

    dvc repro prepare                       # the VQ-VAE rows train on the prepared train split
    python benchmarks/ddp_speed.py          # 1 process (all cores) vs 2 processes (half the cores each)
    python benchmarks/ddp_speed.py --steps 40 --procs 4

Prints, per model: images (or tokens) per second for each process count, their ratio, and the largest difference
of any trained weight (and, for the VQ-VAE, of the EMA codebook) between the runs. The prior trains on random code grids at
the default grid size (its speed does not depend on what the codes are). On a 2-core CPU expect no gain: the point
of the rows is that the ranks train the one-process model; the speed-up comes with more cores or GPUs.
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from stages import _paths as paths
from vqprior import distributed
from vqprior.config import load_params
from vqprior.data.images import Normalisation, load_stats, read_images
from vqprior.models.prior import Prior
from vqprior.models.vqvae import VQVAE
from vqprior.runtime import Runtime, seed_everything
from vqprior.training import fit

VAL = 64  # a token validation set: fit evaluates once per epoch


def train(kind: str, steps: int, params_file: str, out: Path) -> dict:
    """`steps` optimiser steps of `kind` at the params' sizes under the current world; weights and seconds."""
    p = load_params(params_file)
    runtime = Runtime(device=torch.device("cpu"), precision="fp32")
    seed_everything(p.seed)
    if kind == "vqvae":
        cfg = p.train_vqvae
        stats = load_stats(paths.PREPARED, needs=("normalisation",))
        norm = Normalisation.from_dict(stats["normalisation"])
        x = norm.to_model(read_images(paths.TRAIN_IMAGES, limit=steps * cfg.train.batch_size + VAL).images)
        model = VQVAE(cfg.model.model_copy(update={"usage_entropy": 0.0}), in_channels=x.shape[1], normalisation=norm)
        x_train, x_val = x[:-VAL], x[-VAL:]

        def step(idx):
            loss, stats, _ = model.loss(x_train[idx])
            return loss, stats

        def evaluate():
            return {"mse": float(model.loss(x_val)[0])}
        per_item, unit = 1, "images/s"
    else:
        cfg = p.train_prior
        side = 28 // 2 ** p.train_vqvae.model.downsamples
        vocab = p.train_vqvae.model.codebook_size
        codes = torch.randint(0, vocab, (steps * cfg.train.batch_size + VAL, side * side),
                              generator=torch.Generator().manual_seed(p.seed))
        model = Prior(cfg.model.model_copy(update={"dropout": 0.0, "attn_dropout": 0.0, "token_noise": 0.0,
                                                   "num_classes": 0}), vocab=vocab, length=side * side)
        x_train, x_val = codes[:-VAL], codes[-VAL:]

        def step(idx):
            return model.loss(x_train[idx])

        def evaluate():
            return {"mse": float(model.loss(x_val)[0])}
        per_item, unit = side * side, "tokens/s"
    train_params = cfg.train.model_copy(update={"epochs": 1, "patience": 1})
    result = fit(model, len(x_train), step, evaluate, train_params, runtime, seed=p.seed,
                 checkpoint=out / f"checkpoint_{kind}.pt", monitor="mse", desc=f"{kind} x{distributed.world()}")
    (out / f"checkpoint_{kind}.pt").unlink(missing_ok=True)
    return {"state": model.state_dict(), "rate": len(x_train) * per_item / result.seconds, "unit": unit}


def _rank(rank: int, world: int, port: int, kind: str, steps: int, params_file: str, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    distributed.start("unused", load_params(params_file).compute.model_copy(update={"procs": world, "device": "cpu"}))
    result = train(kind, steps, params_file, out)
    if distributed.is_main():
        torch.save(result, out / f"{kind}_ranks.pt")
    distributed.finish()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=20, help="optimiser steps (of the params' global batch)")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--only", choices=["vqvae", "prior"], action="append")
    args = ap.parse_args()
    print(f"{os.cpu_count()} cores; 1 process with {torch.get_num_threads()} threads vs {args.procs} processes; "
          f"{args.steps} steps each, fp32")
    rows = []
    for kind in args.only or ["vqvae", "prior"]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            one = train(kind, args.steps, args.params, out)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_rank, args=(args.procs, port, kind, args.steps, args.params, out), nprocs=args.procs)
            many = torch.load(out / f"{kind}_ranks.pt", weights_only=False)
        # trained weights; the quantiser's buffers follow the codes' assignment, where a near tie may fall either way
        diff = max((many["state"][k].double() - v.double()).abs().max().item() for k, v in one["state"].items()
                   if not k.startswith("quantizer."))
        book = "quantizer.codebook"
        book_diff = (many["state"][book] - one["state"][book]).abs().max().item() if book in one["state"] else None
        rows.append((kind, one["unit"], one["rate"], many["rate"], diff, book_diff))
    print(f"\n| model | 1 process | {args.procs} processes | ratio | max weight difference | max codebook difference |")
    print("|---|---|---|---|---|---|")
    for kind, unit, one_rate, many_rate, diff, book_diff in rows:
        print(f"| {kind} | {one_rate:,.0f} {unit} | {many_rate:,.0f} {unit} | {many_rate / one_rate:.2f}x | {diff:.2e} | "
              f"{'-' if book_diff is None else f'{book_diff:.2e}'} |")


if __name__ == "__main__":
    main()
