"""reconstruction_fid: rFID, the ceiling the VQ-VAE sets for the whole pipeline.

The VQ-VAE's reconstructions of the first `evaluate.num_reference` test images against those images' cached
features (from `reference`): a prior can at best produce samples as good as what the decoder can draw. A stage of
its own because it depends on models/vqvae.pt only: retraining the prior or resampling does not re-run it, and
retraining the VQ-VAE does not re-extract the real images' features.
"""
from __future__ import annotations

from pathlib import Path

import torch

from stages._tracking import tracked_run
from vqprior.config import load_params
from vqprior.features import load_features, read_uint8_images, score
from vqprior.io import write_json_atomic
from vqprior.models.vqvae import load_vqvae
from vqprior.runtime import resolve_runtime

BATCH = 500  # VQ-VAE reconstruction batch (the VQ-VAE is cheap; Inception uses evaluate.batch_size)


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, runtime) -> torch.Tensor:
    """uint8 N x C x H x W -> the VQ-VAE's reconstructions, uint8 N x C x H x W."""
    out = []
    for start in range(0, len(images), BATCH):
        x = model.normalisation.to_model(images[start : start + BATCH].permute(0, 2, 3, 1)).to(runtime.device)
        with runtime.autocast():
            out.append(model.normalisation.to_uint8(model(x)[0]).cpu())
    return torch.cat(out)


def main() -> None:
    p = load_params()
    cfg = p.evaluate
    runtime = resolve_runtime(p.compute)
    with tracked_run("reconstruction_fid", p) as run:
        reference = load_features()  # before the model: a missing reference stage fails first
        model, _ = load_vqvae("models/vqvae.pt", runtime.device)
        recon = reconstruct(model, read_uint8_images(Path("data/prepared/test.parquet"), limit=len(reference)), runtime)
        print(f"reconstruction_fid: {len(recon)} VQ-VAE reconstructions of test images vs their cached features")
        r = score(recon, reference, batch_size=cfg.batch_size, prc_neighborhood=cfg.prc_neighborhood,
                  device=str(runtime.device), bf16=cfg.inception_bf16)
        metrics = {"rfid": r["fid"], "rprecision": r["precision"], "rrecall": r["recall"], "rkid": r["kid"],
                   "num_images": len(recon), "seconds": r["seconds"], "images_per_second": r["images_per_second"]}
        write_json_atomic("metrics/reconstruction.json", metrics)
        run.log_metrics(metrics)
        print(f"reconstruction_fid: rFID {r['fid']:.2f}, precision {r['precision']:.3f}, recall {r['recall']:.3f} "
              f"({r['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
