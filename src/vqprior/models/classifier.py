"""A small CNN trained on the data set's own labels: its penultimate layer is a second feature space for FID and
precision/recall, one that knows Fashion-MNIST (Inception was trained on ImageNet photos at 299x299).

Registered with torch-fidelity as ``CLASSIFIER`` ("fashion-classifier") on import of this module, so
``metrics.extract_features(images, extractor=CLASSIFIER, feature_extractor_weights_path=...)`` and
``metrics.fidelity_metrics(..., extractor=CLASSIFIER)`` use it (the default weights are ``models/classifier.pt``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ClassifierModelParams
from ..extractors import FeatureExtractor, register
from . import read_checkpoint

CLASSIFIER = "fashion-classifier"
DEFAULT_WEIGHTS = "models/classifier.pt"


def scale_images(x: torch.Tensor) -> torch.Tensor:
    """Pixel values 0..255 (uint8, or a float gray mean of them) -> float in [-1, 1]: one scaling for training and
    for feature extraction, so the extractor sees exactly what the network was trained on."""
    return x.float().div(127.5).sub(1.0)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    layers = []
    for c in (c_in, c_out):
        layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2))


class Classifier(nn.Module):
    def __init__(self, p: ClassifierModelParams, *, in_channels: int, num_classes: int):
        super().__init__()
        self.config, self.in_channels, self.num_classes = p, in_channels, num_classes
        self.body = nn.Sequential(_block(in_channels, p.channels), _block(p.channels, 2 * p.channels))
        self.feature = nn.Linear(2 * p.channels, p.feature_dim)
        self.head = nn.Linear(p.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled float N x C x H x W -> N x feature_dim (the layer FID is computed on)."""
        return F.relu(self.feature(self.body(x).mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor):
        """(cross-entropy, stats) as `training.fit` expects from a step."""
        logits = self(x).float()
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean()}


def load_classifier(path, device: torch.device | str = "cpu") -> tuple[Classifier, dict]:
    state = read_checkpoint(path, "train_classifier")
    model = Classifier(ClassifierModelParams(**state["config"]), in_channels=state["in_channels"],
                       num_classes=state["num_classes"])
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval(), state


class ClassifierFeatures(FeatureExtractor):
    """torch-fidelity extractor: uint8 N x C x H x W -> the trained classifier's feature layer (float32)."""

    LAYER = "features"

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net, state = load_classifier(feature_extractor_weights_path or DEFAULT_WEIGHTS)
        self.size = tuple(state["image_shape"][:2])
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected N x C x H x W images with C = 1 or 3, got {tuple(x.shape)}")
        if tuple(x.shape[2:]) != self.size:
            raise ValueError(f"the classifier was trained on {self.size[0]}x{self.size[1]} images, "
                             f"got {x.shape[2]}x{x.shape[3]}; resize them or train it on this size")
        if x.shape[1] != self.net.in_channels:  # RGB -> gray by the channel mean, gray -> RGB by repetition
            x = x.float().mean(1, keepdim=True) if self.net.in_channels == 1 else x.expand(-1, 3, -1, -1)
        return (self.net.features(scale_images(x)).float(),)


register(CLASSIFIER, ClassifierFeatures)
