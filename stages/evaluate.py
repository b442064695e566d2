"""evaluate: FID, KID, precision and recall of the samples against the cached test features (torch-fidelity, TF
Inception). Only the samples go through Inception; the real set's features come from the `reference` stage, and the
data floor (`reference`) and the VQ-VAE's ceilings (`reconstruction_fid`: rFID, and the perfect-prior ceiling, what
samples of the training codes' exact distribution would score) are copied beside the result for scale.

Precision and recall are also split by class (`recall_by_class`: each real class's share inside the samples' manifold;
`precision_by_class`: each sampled class's share inside the real one), beside the floor's split from `reference`:
they say which classes the prior misses.

The same numbers in a second feature space, the `train_classifier` CNN's (one that knows small grayscale images),
come out as `classifier_fid`, `classifier_precision`, `classifier_recall`; Inception's stay the headline.

The generator it scored (the VQ-VAE and the prior) becomes a new version of the registered model
`<experiment>-generator` with these scores (stages/_registry.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from stages._cli import speaks
from stages._registry import model_name, register_generator
from stages._tracking import tracked_run
from stages import _paths as paths
from vqprior.config import load_params
from vqprior.errors import InputError, require
from vqprior.features import read_uint8_images, score_samples
from vqprior.io import extra_sample_sets, write_report
from vqprior.extractors import INCEPTION
from vqprior.metrics import extract_features, metrics_from_features
from vqprior.models.classifier import CLASSIFIER
from vqprior.runtime import resolve_runtime

# metrics/evaluate.json: what a user compares across runs; all, with the floor and ceilings it quotes, in reports/
REFERENCE = {"reference_features": paths.TEST_FEATURES, "reference_images": paths.TEST_IMAGES}  # samples vs these
HEADLINE = {k: k for k in ("fid", "precision", "recall", "fid_std", "classifier_fid")}


def read_metrics(stage: str, keys) -> dict:
    """`keys` of `stage`'s report, each required."""
    path = paths.REPORTS[stage].detail
    metrics = json.loads(require(path, stage).read_text())
    if missing := [k for k in keys if k not in metrics]:
        raise InputError(path, stage, f"lacks {', '.join(missing)} (written by older code?)")
    return {k: metrics[k] for k in keys}


def read_samples(path: str | Path, stage: str) -> torch.Tensor:
    try:
        return torch.from_numpy(np.load(require(path, stage)))
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, stage, f"is not a readable .npy file ({exc.__class__.__name__})") from None


def classifier_metrics(generated: torch.Tensor, num_reference: int, prc_neighborhood: int, device: str) -> dict:
    """FID / precision / recall in the classifier's feature space: the samples vs the same first test images."""
    reference = read_uint8_images(paths.TEST_IMAGES, limit=num_reference)
    feats = [extract_features(x, extractor=CLASSIFIER, batch_size=500, device=device,
                              feature_extractor_weights_path=paths.CLASSIFIER) for x in (generated, reference)]
    m = metrics_from_features(*feats, prc_neighborhood=prc_neighborhood)
    return {f"classifier_{k}": m[k] for k in ("fid", "precision", "recall", "f_score")}


def seed_spread(headline: dict, extra_sets: list[torch.Tensor], cfg, device: str) -> dict:
    """Mean and standard deviation of FID, precision and recall over the headline set and the extra sets `sample` drew
    with the next seeds (`sample.seeds`): a difference between two runs smaller than this is sampling noise. (Not KID:
    its `kid_std` is torch-fidelity's spread over subsets of one set.)"""
    sets = [headline] + [score_samples(images, cfg, device, **REFERENCE) for images in extra_sets]
    keys = ("fid", "precision", "recall")
    spread = {"sample_sets": len(sets)}
    for key in keys:
        values = np.array([s[key] for s in sets])
        spread |= {f"{key}_mean": float(values.mean()), f"{key}_std": float(values.std(ddof=1)) if len(sets) > 1 else 0.0}
    return spread | {"per_set": {key: [s[key] for s in sets] for key in keys}}


@speaks
def main() -> None:
    p = load_params()
    runtime = resolve_runtime(p.compute)
    with tracked_run("evaluate", p) as run:
        # every input read and checked before minutes of Inception
        sets = {path: read_samples(path, "sample") for path in [paths.SAMPLES / "images.npy",
                                                                *extra_sample_sets(paths.SAMPLES)]}
        generated, *extra_sets = sets.values()
        labels_file = paths.SAMPLES / "labels.npy"  # a conditional prior's sample classes
        labels = torch.from_numpy(np.load(labels_file)) if labels_file.exists() else None
        real_shape = tuple(read_uint8_images(paths.TEST_IMAGES, limit=1).shape[1:])
        for path, images in sets.items():
            if tuple(images.shape[1:]) != real_shape:
                raise InputError(path, "sample", f"holds images of {tuple(images.shape[1:])} (C, H, W) but the test "
                                 f"split's are {real_shape}")
        require(paths.CLASSIFIER, "train_classifier")
        require(paths.VQVAE, "train_vqvae")  # registered with the scores
        require(paths.PRIOR, "train_prior")
        scored = ("fid", "precision", "recall", "recall_by_class")
        context = read_metrics("reference", [f"floor_{k}" for k in scored])
        context |= read_metrics("reconstruction_fid", ["rfid"] + [f"prior_ceiling_{k}" for k in scored])
        accuracy = read_metrics("train_classifier", ["test_accuracy"])["test_accuracy"]
        print(f"evaluate: {len(generated)} samples vs the cached test features, {INCEPTION}")
        metrics = score_samples(generated, p.evaluate, str(runtime.device), **REFERENCE, by_class=True, labels=labels)
        metrics |= context
        metrics |= seed_spread(metrics, extra_sets, p.evaluate, str(runtime.device))
        metrics["inception_images"] = sum(len(images) for images in sets.values())
        metrics |= classifier_metrics(generated, p.evaluate.num_reference, p.evaluate.prc_neighborhood,
                                      str(runtime.device))
        metrics["classifier_test_accuracy"] = accuracy
        write_report(*paths.REPORTS["evaluate"], metrics, HEADLINE)
        run.log_metrics(metrics)
        run.log_artifact(paths.REPORTS["evaluate"].metrics)
        run.log_artifact(paths.REPORTS["evaluate"].detail)
        if version := register_generator(run, p.tracking.experiment, metrics):
            print(f"evaluate: registered the generator as version {version} of {model_name(p.tracking.experiment)} "
                  f"(`python -m stages.promote` makes it the champion if its FID is better)")
        print(f"evaluate: FID {metrics['fid']:.2f}, precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f} "
              f"(floor {metrics['floor_fid']:.2f} / {metrics['floor_precision']:.3f} / {metrics['floor_recall']:.3f}; "
              f"perfect-prior ceiling {metrics['prior_ceiling_fid']:.2f} / {metrics['prior_ceiling_precision']:.3f} / "
              f"{metrics['prior_ceiling_recall']:.3f}; rFID {metrics['rfid']:.2f}) ({metrics['seconds']:.0f}s, "
              f"{metrics['images_per_second']:.1f} images/s); classifier space: FID {metrics['classifier_fid']:.2f}, "
              f"precision {metrics['classifier_precision']:.3f}, recall {metrics['classifier_recall']:.3f}")
        if metrics["recall_by_class"]:
            floor, ceiling = metrics["floor_recall_by_class"], metrics["prior_ceiling_recall_by_class"]
            print("evaluate: recall by class (perfect-prior ceiling, floor): " + ", ".join(
                f"{c} {v:.3f} ({ceiling.get(c, float('nan')):.3f}, {floor.get(c, float('nan')):.3f})"
                for c, v in metrics["recall_by_class"].items()))
        if metrics["sample_sets"] > 1:
            print(f"evaluate: over {metrics['sample_sets']} sample sets (`sample.seeds`), mean ± std: "
                  f"FID {metrics['fid_mean']:.2f} ± {metrics['fid_std']:.2f}, precision {metrics['precision_mean']:.3f} "
                  f"± {metrics['precision_std']:.3f}, recall {metrics['recall_mean']:.3f} ± {metrics['recall_std']:.3f}")


if __name__ == "__main__":
    main()
