"""Matplotlib figures for the reports: `plt` set to draw off-screen, `save_figure` to write them atomically.

Apart from grids.py (images as PNG grids) so that a change here re-runs only the stages that draw figures.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_path  # noqa: E402


def save_figure(fig, path: str | Path) -> None:
    """Lay out, write as PNG (temp file, then rename) and free the figure."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
