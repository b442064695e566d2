"""train_prior: a decoder-only Transformer over the flattened code grids (class-conditional when num_classes > 0)."""
from __future__ import annotations

import math

import torch

from stages._cli import speaks
from stages._tracking import tracked_run
from stages import _paths as paths
from vqprior.codes import read_codes
from vqprior import distributed
from vqprior.config import load_params
from vqprior.errors import ParamsError, TrainingError
from vqprior.health import code_frequency_nll, collapse_line, prior_collapse
from vqprior.io import write_history_csv, write_report
from vqprior.models import save_model
from vqprior.models.prior import Prior
from vqprior.runtime import resolve_runtime, seed_everything
from vqprior.training import fingerprint, fit

HEADLINE = {"nll": "val_nll"}  # metrics/ column -> key; all in reports/


@torch.no_grad()
def evaluate_prior(prior: Prior, codes: torch.Tensor, labels: torch.Tensor | None, batch_size: int, device) -> dict:
    """Token-weighted NLL (nats/token), top-1 and top-5 accuracy; given the labels when the prior is conditional
    (each rank scores its share)."""
    prior.eval()
    sums = {"nll": 0.0, "top1": 0.0, "top5": 0.0}
    part = distributed.share(len(codes))
    codes, labels = codes[part], None if labels is None else labels[part]
    for start in range(0, len(codes), batch_size):
        batch = codes[start : start + batch_size].to(device)
        _, stats = prior.loss(batch, None if labels is None else labels[start : start + batch_size].to(device))
        for k in sums:
            sums[k] += float(stats[k]) * len(batch)
    total = distributed.all_sum_floats(*sums.values(), float(len(codes)))
    return {k: v / total[-1] for k, v in zip(sums, total)}


@speaks
def main() -> None:
    p = load_params()
    if (ranks_status := distributed.start("stages.train_prior", p.compute)) is not None:
        raise SystemExit(ranks_status)  # this process launched the ranks, which did the work
    cfg = p.train_prior
    runtime = resolve_runtime(p.compute)
    seed_everything(p.seed)
    with tracked_run("train_prior", p) as run:
        # train on the flipped rows too when extract_codes stored them; validate on original images only
        train, val = read_codes(paths.CODES / "train.parquet"), read_codes(paths.CODES / "val.parquet", augmentations=False)
        length = train.grid[0] * train.grid[1]
        x_train = torch.from_numpy(train.codes.reshape(len(train.codes), -1).astype("int64"))
        x_val = torch.from_numpy(val.codes.reshape(len(val.codes), -1).astype("int64"))
        classes = cfg.model.num_classes
        y_train, y_val = (torch.from_numpy(train.labels), torch.from_numpy(val.labels)) if classes else (None, None)
        if classes:  # sampling draws every class, so each must have been trained
            top = int(max(train.labels.max(), val.labels.max()))
            if top < 0:
                raise ParamsError(f"train_prior.model.num_classes is {classes} but the codes carry no labels; "
                                 "set it to 0 for an unconditional prior")
            if top + 1 != classes:
                raise ParamsError(f"train_prior.model.num_classes is {classes} but the codes hold labels 0..{top}; "
                                 f"set it to {top + 1}, or 0 for an unconditional prior")
        # flipped rows get their own tag (0: original images, the kind sampling draws)
        kinds = ["none", *sorted(set(train.augmentation) - {"none"})]
        a_train = torch.zeros(len(x_train), dtype=torch.long)
        for tag, kind in enumerate(kinds[1:], start=1):
            a_train[torch.from_numpy(train.augmentation == kind)] = tag
        prior = Prior(cfg.model, vocab=train.codebook_size, length=length, augmentations=len(kinds)).to(runtime.device)
        runtime.optimise(prior)
        flips = int((a_train > 0).sum())
        if distributed.is_main():
            print(f"train_prior: {len(x_train)} grids ({flips} flipped) of {train.grid[0]}x{train.grid[1]} codes "
                  f"(vocab {train.codebook_size}), {f'{classes} classes' if classes else 'unconditional'}, "
                  f"{prior.num_params():,} params, {runtime.device} {runtime.precision}")

        def step(idx):
            labels = None if y_train is None else y_train[idx].to(runtime.device)
            return prior.loss(x_train[idx].to(runtime.device), labels, a_train[idx].to(runtime.device))

        result = fit(
            prior, len(x_train), step, lambda: evaluate_prior(prior, x_val, y_val, 512, runtime.device), cfg.train, runtime,
            seed=p.seed, checkpoint=paths.checkpoint("train_prior"), monitor="nll", on_epoch=run.log_epoch, desc="train_prior",
            fingerprint=fingerprint(p.seed, p.compute, cfg, train.meta), optimizer=cfg.train.optimizer,
        )
        frequency_nll = code_frequency_nll(x_train, x_val, train.codebook_size)
        collapsed = prior_collapse(result.best["val_nll"], frequency_nll, [e["train_nll"] for e in result.history],
                                   cfg.health)
        advice = "lower train_prior.train.lr or train longer (train_prior.train.epochs)"
        if collapsed and cfg.health.stop:  # the resume state would only be trained again to the same collapse
            if distributed.is_main():
                paths.checkpoint("train_prior").unlink(missing_ok=True)
            raise TrainingError(f"train_prior: {collapse_line(collapsed, advice)} "
                                "(train_prior.health.stop is on: no model written)")
        if not distributed.is_main():  # rank 0 writes the outputs
            return distributed.finish()
        if collapsed:
            print(f"train_prior: warning: {collapse_line(collapsed, advice)}", flush=True)
        save_model(paths.PRIOR, prior, vocab=train.codebook_size, length=length, grid=list(train.grid),
                   augmentations=len(kinds), vqvae_sha256=train.meta["vqvae_sha256"])
        best = result.best
        # bits per image dimension: the whole grid's NLL spread over the image's pixel values
        dims = math.prod(train.meta["image_shape"])
        metrics = {
            "val_nll": best["val_nll"], "val_top1": best["val_top1"], "val_top5": best["val_top5"],
            "val_bits_per_dim": best["val_nll"] * length / (dims * math.log(2)),
            "frequency_nll": frequency_nll, "collapsed": bool(collapsed),
            "params": prior.num_params(), "num_classes": classes, "train_rows": len(x_train),
            "epochs": result.epochs, "best_epoch": best["epoch"],
            "stopped_early": result.stopped_early, "train_seconds": round(result.seconds, 1),
            "precision": runtime.precision, "device": runtime.device.type,
        }
        write_report(*paths.REPORTS["train_prior"], metrics, HEADLINE)
        write_history_csv("plots/train_prior.csv", result.history)
        run.log_metrics(metrics)
        run.log_artifact("plots/train_prior.csv")
        paths.checkpoint("train_prior").unlink(missing_ok=True)
        print(f"train_prior: val NLL {metrics['val_nll']:.3f} nats/token, top-1 {metrics['val_top1']:.3f}, "
              f"top-5 {metrics['val_top5']:.3f}")
    distributed.finish()


if __name__ == "__main__":
    main()
