"""analyse_prior: where the prior's NLL goes, teacher-forced on the validation grids (as train_prior's `val_nll`).

- By grid position: nats per code at each place of the grid (`val_nll_by_position`, and reports/prior_nll_map.png
  beside the mean validation image).
- On flat patches (the image patch a code stands for has a pixel range of at most FLAT_RANGE: plain background)
  against detailed ones. A code on a flat patch that still costs nats carries its neighbours' content: the encoder's
  receptive field reaches well past the code's own patch.
- By class, beside the NLL of as many train grids as there are val grids (the first ones): the val - train gap says
  which classes the prior overfits.

A stage of its own, so that it reads the trained prior and changes nothing upstream.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stages._cli import speaks
from stages._tracking import tracked_run
from stages import _paths as paths
from vqprior.codes import CodeGrid, read_codes
from vqprior.config import load_params
from vqprior.data.images import read_images
from vqprior.errors import InputError
from vqprior.figures import plt, save_figure
from vqprior.io import write_report
from vqprior.models.prior import load_prior
from vqprior.runtime import resolve_runtime

FLAT_RANGE = 4  # uint8 levels: a patch whose max - min is at most this shows nothing but its background
BATCH = 512


@torch.no_grad()
def token_nll(prior, grids: CodeGrid, runtime, limit: int | None = None) -> torch.Tensor:
    """Teacher-forced NLL (nats) of every code of the first `limit` grids, N x L; given the class when conditional."""
    codes = torch.from_numpy(grids.codes[:limit].reshape(-1, grids.grid[0] * grids.grid[1]).astype("int64"))
    labels = torch.from_numpy(grids.labels[:limit]) if prior.num_classes else None
    out = []
    for start in range(0, len(codes), BATCH):
        x = codes[start : start + BATCH].to(runtime.device)
        y = None if labels is None else labels[start : start + BATCH].to(runtime.device)
        with runtime.autocast():
            logits, _ = prior(prior.with_start(x), labels=y)
        out.append(F.cross_entropy(logits.float().transpose(1, 2), x, reduction="none").cpu())
    return torch.cat(out)


def flat_patches(images: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """uint8 N x H x W x C -> bool N x (gh * gw): is the patch under each code flat (pixel range <= FLAT_RANGE)?"""
    n, h, w, c = images.shape
    gh, gw = grid
    patches = images.reshape(n, gh, h // gh, gw, w // gw, c).astype(np.int16)
    spread = patches.max(axis=(2, 4, 5)) - patches.min(axis=(2, 4, 5))
    return (spread <= FLAT_RANGE).reshape(n, gh * gw)


def by_class(nll: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """Mean NLL per token of each label's grids (unknown labels, -1, left out)."""
    per_grid = nll.mean(1).numpy()
    return {str(c): round(float(per_grid[labels == c].mean()), 4) for c in sorted(set(labels.tolist()) - {-1})}


def summarise(val: torch.Tensor, train: torch.Tensor, flat: np.ndarray, val_labels: np.ndarray,
              train_labels: np.ndarray, grid: tuple[int, int]) -> dict:
    """The breakdown of the per-code NLLs (N x L) into metrics."""
    flat_t = torch.from_numpy(flat)
    val_by, train_by = by_class(val, val_labels), by_class(train, train_labels)
    on_flat = float(val[flat_t].sum() / val.sum())
    return {
        "val_nll": round(float(val.mean()), 4), "train_nll": round(float(train.mean()), 4),
        "gap": round(float(val.mean() - train.mean()), 4),
        "val_nats_per_image": round(float(val.sum(1).mean()), 2),
        "val_nll_by_position": val.mean(0).double().reshape(grid).numpy().round(3).tolist(),
        "flat_share": round(float(flat.mean()), 4),
        "val_nll_flat": round(float(val[flat_t].mean()), 4) if flat.any() else None,
        "val_nll_detail": round(float(val[~flat_t].mean()), 4) if (~flat).any() else None,
        "flat_nll_share": round(on_flat, 4),
        "val_nll_by_class": val_by, "train_nll_by_class": train_by,
        "gap_by_class": {c: round(val_by[c] - train_by[c], 4) for c in val_by if c in train_by},
        "num_val": len(val), "num_train": len(train),
    }


def save_nll_map(metrics: dict, mean_image: np.ndarray, path: str | Path) -> None:
    """The mean validation image beside the per-position NLL map (nats per code, written in each cell)."""
    grid = np.array(metrics["val_nll_by_position"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4.2))
    left.imshow(mean_image.squeeze(-1) if mean_image.shape[-1] == 1 else mean_image.astype(np.uint8),
                cmap="gray" if mean_image.shape[-1] == 1 else None)
    left.set_title("mean validation image")
    shown = right.imshow(grid, cmap="viridis")
    for (r, c), value in np.ndenumerate(grid):
        right.text(c, r, f"{value:.1f}", ha="center", va="center", fontsize=8, color="white" if value < grid.mean() else "black")
    right.set_title(f"val NLL per code (nats; mean {metrics['val_nll']:.3f})")
    fig.colorbar(shown, ax=right, fraction=0.046)
    for ax in (left, right):
        ax.set_xticks([]), ax.set_yticks([])
    save_figure(fig, path)


@speaks
def main() -> None:
    p = load_params()
    runtime = resolve_runtime(p.compute)
    with tracked_run("analyse_prior", p) as run:
        t0 = time.perf_counter()
        prior, prior_state = load_prior(paths.PRIOR, runtime.device)
        val, train = read_codes(paths.CODES / "val.parquet", False), read_codes(paths.CODES / "train.parquet", False)
        if prior_state.get("vqvae_sha256", val.meta["vqvae_sha256"]) != val.meta["vqvae_sha256"]:
            raise InputError(paths.PRIOR, "train_prior", f"was trained on codes of another VQ-VAE than {paths.CODES}'s")
        images = read_images(paths.PREPARED / "val.parquet").images[val.index]  # the val grids' own images, row for row
        print(f"analyse_prior: teacher-forced NLL of {len(val.codes)} val grids and as many train grids "
              f"({val.grid[0]}x{val.grid[1]}, {runtime.device} {runtime.precision})")
        n = len(val.codes)  # as many train grids as val ones: enough for the gap, and quick
        metrics = summarise(token_nll(prior, val, runtime), token_nll(prior, train, runtime, limit=n),
                            flat_patches(images, val.grid), val.labels, train.labels[:n], val.grid)
        metrics["seconds"] = round(time.perf_counter() - t0, 1)
        save_nll_map(metrics, images.mean(0), "reports/prior_nll_map.png")
        write_report(*paths.REPORTS["analyse_prior"], metrics)
        run.log_metrics(metrics)
        run.log_artifact("reports/prior_nll_map.png")
        flat = ("" if metrics["val_nll_flat"] is None else
                f"; {metrics['flat_share']:.0%} of the codes sit on flat patches, at {metrics['val_nll_flat']:.3f} "
                f"nats each ({metrics['flat_nll_share']:.0%} of the NLL)")
        print(f"analyse_prior: val NLL {metrics['val_nll']:.3f}, train {metrics['train_nll']:.3f} (gap "
              f"{metrics['gap']:.3f}){flat} ({metrics['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
