"""Model checkpoints hold the config they were built from, so loading needs no params (loaders live beside each model)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..io import atomic_path


def save_model(path: str | Path, model: torch.nn.Module, **extra) -> None:
    state = {"config": model.config.model_dump(), "state_dict": model.state_dict(), **extra}
    save_state(state, path)


def save_state(state: dict, path: str | Path) -> None:
    """torch.save, atomically and byte-reproducibly: given a file name, torch.save names the archive inside after it,
    and the temporary name is random, so equal weights would hash differently and DVC would re-run what follows."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def read_checkpoint(path: str | Path, stage: str) -> dict:
    """A saved model's dict; a missing or unreadable file names the stage that writes it."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"error: {path} not found; run `dvc repro {stage}` first")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SystemExit(f"error: {path} is not a readable checkpoint ({exc.__class__.__name__}); re-run `dvc repro {stage}`") from None
