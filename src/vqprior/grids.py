"""Images shown as one PNG: a grid of N images, and the sample grid (one row per class for a conditional prior)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .io import atomic_path


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None, pad: int = 2) -> None:
    """uint8 N x C x H x W -> one PNG grid, row-major."""
    x = torch.as_tensor(images)
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    array = canvas.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if c == 1 else array)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_sample_grid(images: torch.Tensor, classes: int, path: str | Path) -> None:
    """A PNG of the first samples: one row per class when the prior is conditional (sample i has class i % classes)."""
    if classes and len(images) >= classes:
        per = min(8, len(images) // classes)  # the first per * classes samples regroup exactly into rows
        save_grid(images[: per * classes].unflatten(0, (per, classes)).transpose(0, 1).flatten(0, 1), path, nrow=per)
    else:
        save_grid(images[:64], path, nrow=8)
