"""Sample-quality metrics (FID, precision/recall, optional KID) through torch-fidelity, in any feature space of
extractors.py (the Inception by default).

``fidelity_metrics(generated, reference)`` takes uint8 N x C x H x W tensors (C = 1 or 3) and returns plain floats.
``extract_features(images)`` and ``metrics_from_features(generated_features, reference_features)`` split the same
computation in two, so reference features can be extracted once, saved, and reused: both go through torch-fidelity's
own functions and give the same numbers as ``fidelity_metrics`` on the same images.
"""
from __future__ import annotations

import contextlib

import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_part, prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from .extractors import INCEPTION


class _ImageTensorDataset(Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def _check_images(name: str, x) -> None:
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a torch.Tensor of uint8 images, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise ValueError(f"{name} must have dtype torch.uint8 (values 0..255), got {x.dtype}")
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be N x C x H x W with C = 1 or 3, got shape {tuple(x.shape)}")
    if len(x) == 0:
        raise ValueError(f"{name} is empty")


def feature_layer(extractor: str) -> str:
    if extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"unknown feature extractor {extractor!r}; registered: {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    return FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid")


def extract_features(
    images: torch.Tensor,
    *,
    extractor: str = INCEPTION,
    batch_size: int = 50,
    device: str = "cpu",
    verbose: bool = False,
    **extractor_kwargs,
) -> torch.Tensor:
    """float32 N x D features (on the CPU) of uint8 N x C x H x W images, through torch-fidelity's own extraction.

    ``extractor_kwargs`` go to the extractor's constructor (e.g. ``inception_channels_last``, ``inception_bf16``).
    """
    _check_images("images", images)
    layer = feature_layer(extractor)
    device = torch.device(device)
    cuda = device.type == "cuda"
    with torch.cuda.device(device) if cuda else contextlib.nullcontext():
        net = create_feature_extractor(extractor, [layer], cuda=cuda, verbose=verbose, **extractor_kwargs)
        feats = get_featuresdict_from_dataset(_ImageTensorDataset(images.cpu()), net, batch_size, cuda,
                                              save_cpu_ram=True, verbose=verbose)
    return feats[layer].cpu()


def metrics_from_features(
    generated: torch.Tensor,
    reference: torch.Tensor,
    *,
    prc_neighborhood: int = 3,
    kid: bool = False,
) -> dict:
    """FID, precision, recall, F-score (and KID) from N x D features, by torch-fidelity's own functions.

    Same conventions and numbers as ``fidelity_metrics`` (``generated`` is torch-fidelity's input1, ``reference``
    input2; KID on subsets of min(1000, N) with torch-fidelity's default seed).
    """
    for name, f in (("generated", generated), ("reference", reference)):
        if not torch.is_tensor(f) or f.dim() != 2 or len(f) == 0:
            raise ValueError(f"{name} features must be a non-empty N x D tensor, got {getattr(f, 'shape', type(f))}")
    if generated.shape[1] != reference.shape[1]:
        raise ValueError(f"feature widths differ: generated {generated.shape[1]}, reference {reference.shape[1]}")
    n_gen, n_ref = len(generated), len(reference)
    _check_counts(n_gen, n_ref, prc_neighborhood)
    generated, reference = generated.detach().cpu().float(), reference.detach().cpu().float()
    out = fid_statistics_to_metric(fid_features_to_statistics(generated), fid_features_to_statistics(reference),
                                   verbose=False)
    out |= prc_features_to_metric(generated, reference, prc_neighborhood=prc_neighborhood, save_cpu_ram=True,
                                  verbose=False)
    if kid:
        out |= kid_features_to_metric(generated, reference, kid_subset_size=_kid_subset_size(n_gen, n_ref),
                                      verbose=False)
    return _plain_metrics(out, kid) | {"num_samples": n_gen, "num_reference": n_ref}


def precision_recall_by_class(
    generated: torch.Tensor,
    reference: torch.Tensor,
    generated_labels: torch.Tensor | None,
    reference_labels: torch.Tensor,
    *,
    prc_neighborhood: int = 3,
) -> dict:
    """The precision and recall of ``metrics_from_features`` split by class, by torch-fidelity's own k-NN test.

    A real class's recall is the share of its images inside the manifold of all generated samples; a generated
    class's precision the share of its samples inside the manifold of all real images (the manifolds are those of
    the overall numbers, so the count-weighted means of the classes are the overall recall and precision). Says which
    classes a model misses. Without ``generated_labels`` (an unconditional prior): recall only. Classes with no more
    than ``prc_neighborhood`` images on their side are left out.
    """
    generated, reference = generated.detach().cpu().float(), reference.detach().cpu().float()

    def split(labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {str(c): labels == c for c in labels.unique().tolist()
                if c >= 0 and int((labels == c).sum()) > prc_neighborhood}

    # calculate_precision_recall_part(gen, real) measures recall over `real`'s rows against `gen`'s manifold and
    # precision over `gen`'s rows against `real`'s: each call below keeps the half whose manifold is the whole set
    out = {"recall_by_class": {c: calculate_precision_recall_part(generated, reference[rows], prc_neighborhood)[1]
                               for c, rows in split(reference_labels).items()}}
    if generated_labels is not None:
        out["precision_by_class"] = {
            c: calculate_precision_recall_part(generated[rows], reference, prc_neighborhood)[0]
            for c, rows in split(generated_labels).items()}
    return out


def _check_counts(n_gen: int, n_ref: int, prc_neighborhood: int) -> None:
    if min(n_gen, n_ref) <= prc_neighborhood:
        raise ValueError(
            f"need more than prc_neighborhood={prc_neighborhood} images in each set, got {n_gen} generated and {n_ref} reference"
        )


def _kid_subset_size(n_gen: int, n_ref: int) -> int:
    return min(1000, n_gen, n_ref)


def _plain_metrics(out: dict, kid: bool) -> dict:
    """torch-fidelity's metric keys -> this project's plain float fields."""
    keys = {"fid": torch_fidelity.KEY_METRIC_FID, "precision": torch_fidelity.KEY_METRIC_PRECISION,
            "recall": torch_fidelity.KEY_METRIC_RECALL, "f_score": torch_fidelity.KEY_METRIC_F_SCORE}
    if kid:
        keys |= {"kid": torch_fidelity.KEY_METRIC_KID_MEAN, "kid_std": torch_fidelity.KEY_METRIC_KID_STD}
    return {name: float(out[key]) for name, key in keys.items()}


def fidelity_metrics(
    generated: torch.Tensor,
    reference: torch.Tensor,
    *,
    extractor: str = INCEPTION,
    batch_size: int = 50,
    prc_neighborhood: int = 3,
    device: str = "cpu",
    kid: bool = False,
    verbose: bool = False,
) -> dict:
    """FID, precision, recall and F-score (and KID if asked) of ``generated`` against ``reference``.

    Both are uint8 tensors N x C x H x W with C = 1 (repeated to RGB) or 3. Precision is the share of generated
    samples inside the reference manifold, recall the share of reference samples inside the generated one
    (torch-fidelity >= 0.4 convention: input1 = generated, input2 = real).
    """
    _check_images("generated", generated)
    _check_images("reference", reference)
    n_gen, n_ref = len(generated), len(reference)
    _check_counts(n_gen, n_ref, prc_neighborhood)
    layer = feature_layer(extractor)
    device = torch.device(device)
    kwargs = dict(
        input1=_ImageTensorDataset(generated.cpu()),
        input2=_ImageTensorDataset(reference.cpu()),
        fid=True,
        prc=True,
        kid=kid,
        feature_extractor=extractor,
        batch_size=batch_size,
        prc_neighborhood=prc_neighborhood,
        cuda=device.type == "cuda",
        cache=False,
        save_cpu_ram=True,  # no DataLoader worker processes for in-memory tensors; chunked precision/recall
        verbose=verbose,
    )
    if kid:
        kwargs["kid_subset_size"] = _kid_subset_size(n_gen, n_ref)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        out = torch_fidelity.calculate_metrics(**kwargs)
    return _plain_metrics(out, kid) | {"num_samples": n_gen, "num_reference": n_ref, "feature_extractor": extractor,
                                      "feature_layer": layer}
