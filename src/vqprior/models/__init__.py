"""Model checkpoints hold the config they were built from, so loading needs no params (loaders live beside each model)."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..errors import InputError, UnsafeFile, require
from ..io import atomic_path


def save_model(path: str | Path, model: torch.nn.Module, **extra) -> None:
    state = {"config": model.config.model_dump(), "state_dict": model.state_dict(), **extra}
    save_state(state, path)


def save_state(state: dict, path: str | Path) -> None:
    """torch.save, atomically and byte-reproducibly: given a file name, torch.save names the archive inside after it,
    and the temporary name is random, so equal weights would hash differently and a pipeline that compares hashes would re-run what follows."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def load_state(path: str | Path, writer: str) -> dict:
    """A dict that `save_state` wrote, loaded without running code: torch's weights-only unpickler admits tensors and
    plain values only, so a file crafted to run code on load (a pickle with `__reduce__`) is refused, not run. Models
    travel through shared storage; loading one must be safe for every teammate who pulls it."""
    path = require(path, writer)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # a callable or class the file asks to import: how code gets run
            raise UnsafeFile(path, writer, "holds objects other than tensors and plain values (a pickle that could "
                             "run code when loaded) and was refused") from None
        raise InputError(path, writer, "is not a readable checkpoint (UnpicklingError)") from None
    except Exception as exc:  # truncated, not a zip, not torch's: torch raises many types
        raise InputError(path, writer, f"is not a readable checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(state, dict):
        raise InputError(path, writer, f"holds a {type(state).__name__}, not a checkpoint's dict")
    return state


def read_checkpoint(path: str | Path, stage: str) -> dict:
    """A saved model's dict; a missing, unreadable or unsafe file names the stage that writes it."""
    return load_state(path, stage)
