"""Models and their checkpoints: a checkpoint holds the config it was built from, so loading needs no params."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import PriorModelParams, VQVAEModelParams
from ..io import atomic_path


def save_model(path: str | Path, model: torch.nn.Module, **extra) -> None:
    state = {"config": model.config.model_dump(), "state_dict": model.state_dict(), **extra}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load(path: str | Path, stage: str) -> dict:
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"error: {path} not found; run `dvc repro {stage}` first")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SystemExit(f"error: {path} is not a readable checkpoint ({exc.__class__.__name__}); re-run `dvc repro {stage}`") from None


def load_vqvae(path: str | Path, device: torch.device | str = "cpu"):
    from .vqvae import VQVAE

    state = _load(path, "train_vqvae")
    model = VQVAE(VQVAEModelParams(**state["config"]), in_channels=state["in_channels"])
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval(), state


def load_prior(path: str | Path, device: torch.device | str = "cpu"):
    from .prior import Prior

    state = _load(path, "train_prior")
    model = Prior(PriorModelParams(**state["config"]), vocab=state["vocab"], length=state["length"])
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval(), state
