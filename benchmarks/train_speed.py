"""Training and inference speed, fp32 vs bf16 autocast, side by side in one run (same model, same batch).

    python benchmarks/train_speed.py              # VQ-VAE and prior at the default params.yaml sizes
    python benchmarks/train_speed.py --steps 20   # longer, steadier timing
    python benchmarks/train_speed.py --only vqvae # just the VQ-VAE rows (the full-recompute sampling row is slow)

Prints a table: VQ-VAE training images/s, VQ-VAE encode images/s, prior training tokens/s, and prior sampling
samples/s with the KV cache vs recomputing the whole prefix each step. Training speeds are medians of `--repeats`
rounds that alternate fp32 and bf16, so a slow spell on a shared machine hits both sides alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from vqprior.config import load_params
from vqprior.models.prior import Prior
from vqprior.models.vqvae import VQVAE
from vqprior.optimizers import build_optimizer
from vqprior.runtime import cpu_has_bf16
from vqprior.sampling import sample_codes


def timed(fn, steps: int) -> float:
    fn()  # warm-up: oneDNN picks kernels on the first call
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def interleaved(steps_by_precision: dict, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each precision's step function, the precisions taking turns round by round."""
    times = {precision: [] for precision in steps_by_precision}
    for _ in range(repeats):
        for precision, step in steps_by_precision.items():
            times[precision].append(timed(step, steps))
    return {precision: statistics.median(t) for precision, t in times.items()}


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(model, loss_fn, precision, prior_train=None):
    """One optimiser step on loss_fn(model) under `precision`: AdamW, or the optimiser the prior's `train` section
    names (Muon orthogonalises every step, which a speed figure must include)."""
    opt = (build_optimizer(model, prior_train, prior_train.optimizer) if prior_train is not None
           else torch.optim.AdamW(model.parameters()))

    def step():
        with autocast(precision):
            loss = loss_fn(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="fp32/bf16 rounds for the training speeds (median)")
    ap.add_argument("--only", choices=["vqvae", "prior", "sample"], action="append",
                    help="measure just these parts (repeatable); default: all")
    args = ap.parse_args()
    p = load_params(args.params)
    torch.manual_seed(0)
    precisions = ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    parts = set(args.only or ["vqvae", "prior", "sample"])
    rows = []

    if "vqvae" in parts:
        rows += vqvae_rows(p, precisions, args)
    if parts & {"prior", "sample"}:
        grid_h, grid_w = VQVAE(p.train_vqvae.model).grid_size(28, 28)  # the code grid the prior models
        length, vocab = grid_h * grid_w, p.train_vqvae.model.codebook_size
        if "prior" in parts:
            rows += prior_rows(p, precisions, args, length, vocab)
        if "sample" in parts:
            rows += sample_rows(p, precisions, length, vocab)
    print_table(rows, sample_batch=p.sample.batch_size)


def vqvae_rows(p, precisions, args) -> list:
    rows = []
    vq_batch = p.train_vqvae.train.batch_size
    x = torch.rand(vq_batch, 1, 28, 28) * 2 - 1
    vqvaes = {precision: VQVAE(p.train_vqvae.model) for precision in precisions}
    steps = {precision: train_step(m, lambda m: m.loss(x)[0], precision) for precision, m in vqvaes.items()}
    for precision, dt in interleaved(steps, args.steps, args.repeats).items():
        rows.append(("VQ-VAE train", precision, f"batch {vq_batch}", vq_batch / dt, "images/s"))
    for precision, model in vqvaes.items():
        model.eval()
        xe = torch.rand(1024, 1, 28, 28) * 2 - 1
        with autocast(precision):
            dt = timed(lambda: model.encode(xe), max(2, args.steps // 2))
        rows.append(("VQ-VAE encode", precision, "batch 1024", 1024 / dt, "images/s"))
    return rows


def prior_rows(p, precisions, args, length, vocab) -> list:
    rows, pb = [], p.train_prior.train.batch_size
    codes = torch.randint(0, vocab, (pb, length))
    priors = {precision: Prior(p.train_prior.model, vocab=vocab, length=length) for precision in precisions}
    steps = {precision: train_step(m, lambda m: m.loss(codes)[0], precision, p.train_prior.train)
             for precision, m in priors.items()}
    for precision, dt in interleaved(steps, args.steps, args.repeats).items():
        rows.append(("prior train", precision, f"batch {pb}", pb * length / dt, "tokens/s"))
    return rows


def sample_rows(p, precisions, length, vocab) -> list:
    rows = []
    prior = Prior(p.train_prior.model, vocab=vocab, length=length).eval()
    n = p.sample.batch_size  # the sample stage's batch
    for use_cache in (True, False):
        with autocast(precisions[-1]):
            dt = timed(lambda: sample_codes(prior, n, use_cache=use_cache), 1)
        rows.append(("prior sample", precisions[-1], "KV cache" if use_cache else "full recompute", n / dt, "samples/s"))
    return rows


def print_table(rows: list, sample_batch: int) -> None:
    print(f"\n{'what':<14} {'precision':<9} {'setting':<15} {'speed':>10}  unit   (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    for what, precision, setting, speed, unit in rows:
        print(f"{what:<14} {precision:<9} {setting:<15} {speed:>10.0f}  {unit}")
    speed = {(what, precision, setting): v for what, precision, setting, v, _ in rows}
    for what, precision, setting, v, _ in rows:
        if what.endswith("train") and precision == "bf16":
            print(f"bf16 / fp32, {what}: {v / speed[(what, 'fp32', setting)]:.2f}x")
    sampled = {setting: v for what, _, setting, v, _ in rows if what == "prior sample"}
    if sampled:
        print(f"KV cache / full recompute (batch {sample_batch}): "
              f"{sampled['KV cache'] / sampled['full recompute']:.2f}x")


if __name__ == "__main__":
    main()
