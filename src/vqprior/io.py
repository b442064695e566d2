"""Atomic file writes: a killed process leaves the old file or none, never half of one. And where `sample`'s extra sample
sets live, so `sample` and `evaluate` agree on it."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import numpy as np


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path in the same folder; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_split_json(headline_path: str | Path, detail_path: str | Path, values: dict, headline: Iterable[str]) -> None:
    """The `headline` keys of `values` to `headline_path`, every other key to `detail_path`: a short file of the
    numbers compared from run to run, and the breakdowns (by class, by position, the protocol) beside it."""
    headline = set(headline)
    write_json_atomic(headline_path, {k: v for k, v in values.items() if k in headline})
    write_json_atomic(detail_path, {k: v for k, v in values.items() if k not in headline})


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def extra_sample_set(folder: str | Path, seed: int) -> Path:
    """The images `sample` drew with `seed` beside the headline set (`sample.seeds` > 1)."""
    return Path(folder) / f"images_seed{seed}.npy"


def extra_sample_sets(folder: str | Path) -> list[Path]:
    """Every extra sample set in `folder`, in seed order."""
    return sorted(Path(folder).glob("images_seed*.npy"), key=lambda f: int(f.stem.removeprefix("images_seed")))
