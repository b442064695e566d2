"""sample: draw code grids from the prior (temperature, top-k, top-p, KV cache) and decode them.

A class-conditional prior gets labels spread evenly over its classes (sample i is class i % num_classes)
and classifier-free guidance; the PNG grid then shows one row per class.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from stages._tracking import tracked_run
from vqprior.config import load_params
from vqprior.data.images import to_uint8
from vqprior.io import atomic_path, write_json_atomic
from vqprior.models.prior import load_prior
from vqprior.models.vqvae import load_vqvae
from vqprior.plots import save_grid
from vqprior.runtime import resolve_runtime
from vqprior.sampling import sample_in_batches

OUT = Path("data/samples")


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def main() -> None:
    p = load_params()
    cfg = p.sample
    runtime = resolve_runtime(p.compute)
    with tracked_run("sample", p) as run:
        prior, prior_state = load_prior("models/prior.pt", runtime.device)
        vqvae, _ = load_vqvae("models/vqvae.pt", runtime.device)
        gh, gw = prior_state["grid"]
        classes = prior.num_classes
        labels = torch.arange(cfg.num_samples) % classes if classes else None
        t0 = time.perf_counter()
        with runtime.autocast():
            codes = sample_in_batches(prior, cfg.num_samples, cfg.batch_size, p.seed, labels=labels, guidance=cfg.guidance,
                                      temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        sample_seconds = time.perf_counter() - t0
        codes = codes.view(-1, gh, gw)
        images = []
        for start in range(0, len(codes), cfg.batch_size):
            with runtime.autocast():
                images.append(to_uint8(vqvae.decode(codes[start : start + cfg.batch_size].to(runtime.device))).cpu())
        images = torch.cat(images)
        save_npy(OUT / "images.npy", images.numpy())  # N x C x H x W uint8
        save_npy(OUT / "codes.npy", codes.numpy().astype(np.uint16))
        if classes:
            save_npy(OUT / "labels.npy", labels.numpy())  # int64, one per sample
        else:
            (OUT / "labels.npy").unlink(missing_ok=True)  # none from an earlier conditional run
        if classes and cfg.num_samples >= classes:
            # one row per class: sample i has class i % classes, so the first per * classes samples regroup exactly
            per = min(8, cfg.num_samples // classes)
            save_grid(images[: per * classes].unflatten(0, (per, classes)).transpose(0, 1).flatten(0, 1),
                      "reports/samples.png", nrow=per)
        else:
            save_grid(images[:64], "reports/samples.png", nrow=8)
        metrics = {
            "num_samples": cfg.num_samples, "samples_per_second": round(cfg.num_samples / sample_seconds, 1),
            "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
            "num_classes": classes, "guidance": cfg.guidance if classes else None,
            "unique_codes_used": int(np.unique(codes.numpy()).size),
        }
        write_json_atomic("metrics/sample.json", metrics)
        run.log_metrics(metrics)
        run.log_artifact("reports/samples.png")
        guided = f", {classes} classes, guidance {cfg.guidance}" if classes else ""
        print(f"sample: {cfg.num_samples} samples at {metrics['samples_per_second']:.0f}/s "
              f"(T={cfg.temperature}, top_k={cfg.top_k}, top_p={cfg.top_p}{guided})")


if __name__ == "__main__":
    main()
