"""train_vqvae: a convolutional VQ-VAE with an EMA codebook on the prepared train split."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from stages._cli import speaks
from stages._tracking import tracked_run
from stages import _paths as paths
from vqprior import distributed
from vqprior.config import load_params
from vqprior.errors import ParamsError, TrainingError
from vqprior.health import collapse_line, vqvae_collapse
from vqprior.data.images import Normalisation, load_stats, read_images
from vqprior.grids import save_grid
from vqprior.io import write_history_csv, write_report
from vqprior.models import save_model
from vqprior.models.quantizer import codebook_stats
from vqprior.models.vqvae import VQVAE
from vqprior.runtime import resolve_runtime, seed_everything
from vqprior.training import fingerprint, fit

HEADLINE = {"mse": "test_mse", "perplexity": "perplexity"}  # metrics/ column -> key; all in reports/
# per-epoch grids are drawn beside the checkpoint and moved to EPOCH_GRIDS at the end: DVC deletes a stage's outputs
# before it re-runs, so a resumed run would otherwise lose the grids of the epochs before the crash
EPOCH_GRIDS_DRAFT, EPOCH_GRIDS = Path("checkpoints/train_vqvae_epochs"), Path("reports/vqvae_epochs")


@torch.no_grad()
def evaluate_vqvae(model: VQVAE, x: torch.Tensor, batch_size: int, runtime) -> dict:
    """Reconstruction MSE in [0, 1] pixel units, PSNR, and codebook usage/perplexity over the whole set (each rank
    scores its share)."""
    model.eval()
    sq_err, counts = 0.0, torch.zeros(model.config.codebook_size, dtype=torch.long)
    commit = 0.0
    to_unit = model.normalisation.to_unit  # errors in [0, 1] pixel units, the decoded image clamped as saved
    part = x[distributed.share(len(x))]
    for start in range(0, len(part), batch_size):
        xb = part[start : start + batch_size].to(runtime.device)
        with runtime.autocast():
            recon, codes, c = model(xb)
        sq_err += ((to_unit(recon).clamp(0, 1) - to_unit(xb)) ** 2).sum().item()
        commit += c.item() * len(xb)
        counts += torch.bincount(codes.flatten().cpu(), minlength=len(counts))
    sq_err, commit = distributed.all_sum_floats(sq_err, commit)
    counts = distributed.all_sum(counts.to(runtime.device)).cpu()
    mse = sq_err / x.numel()
    usage, perplexity = codebook_stats(counts)
    return {"mse": mse, "psnr": 10 * math.log10(1 / max(mse, 1e-12)), "commit_loss": commit / len(x),
            "codebook_usage": usage, "perplexity": perplexity}


def reconstruction_grid(model: VQVAE, x: torch.Tensor, path: str | Path, runtime, most: int = 32) -> None:
    """Up to `most` images in rows of 8 (fewer when the set is smaller), each row's reconstructions beneath it."""
    per_row = min(8, len(x))
    x = x[: min(most, len(x)) // per_row * per_row]
    with torch.no_grad(), runtime.autocast():
        recon = model(x.to(runtime.device))[0].cpu()
    to_uint8 = model.normalisation.to_uint8
    rows = [to_uint8(t).view(-1, per_row, *x.shape[1:]) for t in (x, recon)]
    save_grid(torch.stack(rows, dim=1).reshape(-1, *x.shape[1:]), path, nrow=per_row)


@speaks
def main() -> None:
    p = load_params()
    if (ranks_status := distributed.start("stages.train_vqvae", p.compute)) is not None:
        raise SystemExit(ranks_status)  # this process launched the ranks, which did the work
    cfg = p.train_vqvae
    runtime = resolve_runtime(p.compute)
    seed_everything(p.seed)
    with tracked_run("train_vqvae", p) as run:
        stats = load_stats(paths.PREPARED, needs=("normalisation", "sha256"))
        norm = Normalisation.from_dict(stats["normalisation"])
        train, val, test = (read_images(paths.PREPARED / f"{s}.parquet") for s in ("train", "val", "test"))
        x_train, x_val, x_test = (norm.to_model(s.images) for s in (train, val, test))
        h, w, c = train.shape
        if h % 2 ** cfg.model.downsamples or w % 2 ** cfg.model.downsamples:
            fits = max(d for d in range(5) if h % 2 ** d == 0 and w % 2 ** d == 0)
            raise ParamsError(f"{h}x{w} images do not halve evenly {cfg.model.downsamples} times "
                             f"(train_vqvae.model.downsamples); use at most {fits}, or another data.image_size")
        model = VQVAE(cfg.model, in_channels=c, normalisation=norm).to(runtime.device)
        runtime.optimise(model.encoder, model.decoder)  # the quantiser's data-dependent updates stay eager
        if distributed.is_main():
            print(f"train_vqvae: {len(x_train)} images {h}x{w}x{c} -> {model.grid_size(h, w)} codes, "
                  f"{sum(t.numel() for t in model.parameters()):,} params, {runtime.device} {runtime.precision}")

        def step(idx):
            x = x_train[idx].to(runtime.device)
            if cfg.hflip:  # flip a random half of the batch
                flip = torch.rand(len(x), device=x.device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss, stats, _ = model.loss(x)
            return loss, stats

        def on_epoch(epoch, metrics):
            metrics["train_psnr"] = 10 * math.log10(1 / max(metrics["train_mse"], 1e-12))
            metrics["dead_code_restarts"], model.quantizer.restarts = model.quantizer.restarts, 0
            run.log_epoch(epoch, metrics)
            if epoch == 1:  # a fresh start: no grids of an earlier, abandoned run
                shutil.rmtree(EPOCH_GRIDS_DRAFT, ignore_errors=True)
            grid = EPOCH_GRIDS_DRAFT / f"epoch_{epoch:03d}.png"
            reconstruction_grid(model, x_val, grid, runtime)
            run.log_artifact(grid, "reconstructions")

        result = fit(
            model, len(x_train), step, lambda: evaluate_vqvae(model, x_val, 1024, runtime), cfg.train, runtime,
            seed=p.seed, checkpoint=paths.checkpoint("train_vqvae"), monitor="mse", on_epoch=on_epoch, desc="train_vqvae",
            fingerprint=fingerprint(p.seed, p.compute, cfg, stats["sha256"]),
        )
        test_metrics = evaluate_vqvae(model, x_test, 1024, runtime)
        # the floor a decoder that ignores its codes reaches: the mean training image for every test image
        mean_image_mse = float(((norm.to_unit(x_test) - norm.to_unit(x_train).mean(0, keepdim=True)) ** 2).mean())
        collapsed = vqvae_collapse(test_metrics["codebook_usage"], test_metrics["perplexity"], test_metrics["mse"],
                                   mean_image_mse, [e["train_mse"] for e in result.history], cfg.health)
        advice = "lower train_vqvae.train.lr or raise train_vqvae.model.usage_entropy"
        if collapsed and cfg.health.stop:  # the resume state would only be trained again to the same collapse
            if distributed.is_main():
                paths.checkpoint("train_vqvae").unlink(missing_ok=True)
                shutil.rmtree(EPOCH_GRIDS_DRAFT, ignore_errors=True)
            raise TrainingError(f"train_vqvae: {collapse_line(collapsed, advice)} "
                                "(train_vqvae.health.stop is on: no model written)")
        if not distributed.is_main():  # rank 0 writes the outputs
            return distributed.finish()
        if collapsed:
            print(f"train_vqvae: warning: {collapse_line(collapsed, advice)}", flush=True)
        save_model(paths.VQVAE, model, in_channels=c, image_shape=[h, w, c], normalisation=norm.as_dict())
        metrics = {
            "test_mse": test_metrics["mse"], "test_psnr": test_metrics["psnr"],
            "codebook_usage": test_metrics["codebook_usage"], "perplexity": test_metrics["perplexity"],
            "mean_image_mse": mean_image_mse, "collapsed": bool(collapsed),
            "val_mse": result.best["val_mse"], "codebook_size": cfg.model.codebook_size,
            "epochs": result.epochs, "best_epoch": result.best["epoch"], "stopped_early": result.stopped_early,
            "train_seconds": round(result.seconds, 1), "precision": runtime.precision, "device": runtime.device.type,
        }
        write_report(*paths.REPORTS["train_vqvae"], metrics, HEADLINE)
        write_history_csv("plots/train_vqvae.csv", result.history)
        reconstruction_grid(model, x_val, "reports/vqvae_reconstructions.png", runtime)  # the best epoch's
        shutil.rmtree(EPOCH_GRIDS, ignore_errors=True)
        EPOCH_GRIDS.parent.mkdir(parents=True, exist_ok=True)
        EPOCH_GRIDS_DRAFT.mkdir(parents=True, exist_ok=True)  # (none if resumed from a run of older code)
        EPOCH_GRIDS_DRAFT.replace(EPOCH_GRIDS)
        run.log_artifact("reports/vqvae_reconstructions.png")
        run.log_metrics(metrics)
        run.log_artifact("plots/train_vqvae.csv")
        paths.checkpoint("train_vqvae").unlink(missing_ok=True)
        print(f"train_vqvae: test MSE {metrics['test_mse']:.5f} (PSNR {metrics['test_psnr']:.2f} dB), "
              f"usage {metrics['codebook_usage']:.3f}, perplexity {metrics['perplexity']:.1f}")
    distributed.finish()


if __name__ == "__main__":
    main()
