"""Cached Inception features: the reference sets are extracted once (stage `reference`) and read back by the stages
that compare against them (`reconstruction_fid`, `evaluate`), so only new images go through the network."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch_fidelity

from .config import EvaluateParams
from .data.images import read_images
from .errors import InputError, require
from .io import atomic_path
from .runtime import resolve_precision
from .extractors import INCEPTION
from .metrics import extract_features, feature_layer, metrics_from_features, precision_recall_by_class

def read_labelled_images(path: str | Path, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` images of a prepared split as uint8 N x C x H x W (torch-fidelity's layout) and their
    labels (-1: none)."""
    split = read_images(path, limit=limit)
    images = torch.from_numpy(split.images.copy()).permute(0, 3, 1, 2).contiguous()  # Parquet buffers are read-only
    return images, torch.from_numpy(split.labels)


def read_uint8_images(path: str | Path, limit: int | None = None) -> torch.Tensor:
    return read_labelled_images(path, limit)[0]


def timed_features(images: torch.Tensor, *, batch_size: int, device: str, extractor: str = INCEPTION,
                   bf16: bool = False) -> tuple[torch.Tensor, float]:
    """Features of `images` (Inception in bf16 if asked) and the seconds their extraction took."""
    t0 = time.perf_counter()
    feats = extract_features(images, extractor=extractor, batch_size=batch_size, device=device, inception_bf16=bf16)
    return feats, time.perf_counter() - t0


def read_labels(path: str | Path, limit: int | None = None) -> torch.Tensor:
    return read_labelled_images(path, limit)[1]


def score(images: torch.Tensor, reference: torch.Tensor, *, batch_size: int, prc_neighborhood: int, device: str,
          extractor: str = INCEPTION, bf16: bool = False, labels: torch.Tensor | None = None,
          reference_labels: torch.Tensor | None = None) -> dict:
    """FID, KID, precision, recall of `images` against cached `reference` features, and the extraction's speed.
    With `reference_labels` also recall by real class and, with the images' own `labels`, precision by class."""
    feats, seconds = timed_features(images, batch_size=batch_size, device=device, extractor=extractor, bf16=bf16)
    metrics = metrics_from_features(feats, reference, prc_neighborhood=prc_neighborhood, kid=True)
    if reference_labels is not None:
        metrics |= precision_recall_by_class(feats, reference, labels, reference_labels, prc_neighborhood=prc_neighborhood)
    return metrics | {"seconds": round(seconds, 1), "images_per_second": round(len(images) / seconds, 1)}


def inception_bf16(cfg: EvaluateParams, device: str | torch.device) -> bool:
    """Whether Inception runs in bf16 under `evaluate.inception_precision` on `device` (auto: only where native)."""
    return resolve_precision(cfg.inception_precision, torch.device(device)) == "bf16"


def score_samples(images: torch.Tensor, cfg: EvaluateParams, device: str, *, reference_features: str | Path,
                  reference_images: str | Path, by_class: bool = False, labels: torch.Tensor | None = None) -> dict:
    """`score` of generated images against the cached features of the test split's first images, with the protocol
    that makes it comparable; `by_class` adds precision and recall by class (the reference's labels read from
    `reference_images`; `labels`: the samples' classes, None for an unconditional prior)."""
    reference = load_features(reference_features)
    bf16 = inception_bf16(cfg, device)
    metrics = score(images, reference, batch_size=cfg.batch_size, prc_neighborhood=cfg.prc_neighborhood,
                    device=device, bf16=bf16, labels=labels,
                    reference_labels=read_labels(reference_images, limit=len(reference)) if by_class else None)
    return metrics | {
        "feature_extractor": INCEPTION, "feature_layer": feature_layer(INCEPTION),
        "reference_split": "test", "reference_images": f"first {len(reference)} of the prepared test split",
        "resize": "bilinear to 299x299, TF1-compatible (torch-fidelity)", "prc_neighborhood": cfg.prc_neighborhood,
        "inception_precision": "bf16" if bf16 else "fp32", "inception_images": len(images),
        "torch_fidelity_version": torch_fidelity.__version__,
    }


def save_features(path: str | Path, features: torch.Tensor) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, features.cpu().numpy().astype(np.float32))


def load_features(path: str | Path) -> torch.Tensor:
    path = require(path, "reference")
    try:
        return torch.from_numpy(np.load(path))  # allow_pickle is off: a cache cannot carry code
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, "reference", f"is not a readable .npy file ({exc.__class__.__name__})") from None
