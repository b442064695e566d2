"""reconstruction_fid: the two ceilings the VQ-VAE sets for the whole pipeline.

- rFID: the VQ-VAE's reconstructions of the first `evaluate.num_reference` test images against those same images'
  cached features. Each real image has its own reconstruction beside it, so this ceiling is an optimistic one
  (recall especially: every real image is covered by its own reconstruction).
- The perfect-prior ceiling (`prior_ceiling_*`): the reconstructions of the floor's train images (the first
  `evaluate.num_reference` of the train split, other images than the reference) against the test features. That is
  what a prior that reproduced the training codes' distribution exactly would score: the floor (`reference`, the same
  train images unreconstructed) minus what the decoder loses. A sampled model's FID / precision / recall are best
  read against it.

A stage of its own because it depends on models/vqvae.pt only: retraining the prior or resampling does not re-run it,
and retraining the VQ-VAE does not re-extract the real images' features.
"""
from __future__ import annotations

import torch

from stages._cli import speaks
from stages._tracking import tracked_run
from stages import _paths as paths
from vqprior.config import load_params
from vqprior.features import inception_bf16, load_features, read_labelled_images, score
from vqprior.io import write_report
from vqprior.models.vqvae import load_vqvae
from vqprior.runtime import resolve_runtime

HEADLINE = {"rfid": "rfid", "ceiling_fid": "prior_ceiling_fid"}  # metrics/ column -> key; all in reports/
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


@speaks
def main() -> None:
    p = load_params()
    cfg = p.evaluate
    runtime = resolve_runtime(p.compute)
    with tracked_run("reconstruction_fid", p) as run:
        reference = load_features(paths.TEST_FEATURES)  # before the model: a missing reference stage fails first
        model, _ = load_vqvae(paths.VQVAE, runtime.device)
        test, test_labels = read_labelled_images(paths.TEST_IMAGES, limit=len(reference))
        train, train_labels = read_labelled_images(paths.TRAIN_IMAGES, limit=len(reference))
        print(f"reconstruction_fid: VQ-VAE reconstructions of {len(test)} test images (rFID) and of {len(train)} "
              "train images (the perfect-prior ceiling) vs the cached test features")
        kw = dict(batch_size=cfg.batch_size, prc_neighborhood=cfg.prc_neighborhood, device=str(runtime.device),
                  bf16=inception_bf16(cfg, runtime.device))
        r = score(reconstruct(model, test, runtime), reference, **kw)
        c = score(reconstruct(model, train, runtime), reference, labels=train_labels, reference_labels=test_labels, **kw)
        seconds = r["seconds"] + c["seconds"]
        metrics = {"rfid": r["fid"], "rprecision": r["precision"], "rrecall": r["recall"], "rkid": r["kid"],
                   "num_images": len(test),
                   "prior_ceiling_fid": c["fid"], "prior_ceiling_precision": c["precision"],
                   "prior_ceiling_recall": c["recall"], "prior_ceiling_kid": c["kid"],
                   "prior_ceiling_recall_by_class": c["recall_by_class"],
                   "prior_ceiling_precision_by_class": c["precision_by_class"], "num_train": len(train),
                   "seconds": round(seconds, 1), "images_per_second": r["images_per_second"],  # Inception's speed
                   "inception_precision": "bf16" if kw["bf16"] else "fp32", "inception_images": len(test) + len(train)}
        write_report(*paths.REPORTS["reconstruction_fid"], metrics, HEADLINE)
        run.log_metrics(metrics)
        print(f"reconstruction_fid: rFID {r['fid']:.2f}, precision {r['precision']:.3f}, recall {r['recall']:.3f}; "
              f"perfect-prior ceiling FID {c['fid']:.2f}, precision {c['precision']:.3f}, recall {c['recall']:.3f} "
              f"({seconds:.0f}s)")


if __name__ == "__main__":
    main()
