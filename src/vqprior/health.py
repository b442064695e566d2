"""When a trained model counts as collapsed: the reasons, worded with the params key that sets each threshold.

Collapse is reported (in the stage's output and its metrics) and is fatal only when the params' `health.stop` says so:
a collapsed model can still be worth a look, and thresholds are guesses a user may tune.
"""
from __future__ import annotations

import math

import torch

from .config import PriorHealthParams, VQVAEHealthParams


def stalled(name: str, per_epoch: list[float], min_drop: float, key: str) -> str | None:
    """Why a training loss (one mean per epoch) counts as stalled: it fell by less than `min_drop` of its first
    epoch's value by the last epoch (the params key `key` sets it); None while it falls, or with one epoch only."""
    if len(per_epoch) < 2 or per_epoch[-1] < per_epoch[0] * (1 - min_drop):
        return None
    return (f"training {name} stopped falling ({per_epoch[0]:.5f} in epoch 1, {per_epoch[-1]:.5f} in epoch "
            f"{len(per_epoch)}: less than {key} {min_drop} lower)")


def vqvae_collapse(usage: float, perplexity: float, mse: float, mean_image_mse: float, train_mse: list[float],
                   p: VQVAEHealthParams) -> list[str]:
    """Why a trained VQ-VAE counts as collapsed (empty: healthy): too few codes in use, reconstructions no better
    than predicting the mean training image for every input (the decoder ignores the codes), or a training MSE
    (`train_mse`, one value per epoch) that stopped falling after the first epoch."""
    reasons = []
    if usage < p.min_codebook_usage:
        reasons.append(f"codebook usage {usage:.3f} < train_vqvae.health.min_codebook_usage {p.min_codebook_usage}")
    if perplexity < p.min_perplexity:
        reasons.append(f"perplexity {perplexity:.2f} < train_vqvae.health.min_perplexity {p.min_perplexity}")
    if mse >= mean_image_mse:
        reasons.append(f"reconstruction MSE {mse:.5f} is no better than the mean image's {mean_image_mse:.5f}")
    if stall := stalled("MSE", train_mse, p.min_loss_drop, "train_vqvae.health.min_loss_drop"):
        reasons.append(stall)
    return reasons


def code_frequency_nll(train: torch.Tensor, val: torch.Tensor, vocab: int) -> float:
    """NLL (nats/token) of the validation codes under the training codes' own frequencies (add-one smoothed): what a
    prior that ignores every earlier code and the class can reach, the baseline a trained prior must beat."""
    counts = torch.bincount(train.reshape(-1), minlength=vocab).double() + 1
    log_p = (counts / counts.sum()).log()
    return float(-log_p[val.reshape(-1)].mean())


def prior_collapse(val_nll: float, frequency_nll: float, train_nll: list[float], p: PriorHealthParams) -> list[str]:
    """Why a trained prior counts as collapsed (empty: healthy): its validation NLL is not `min_gain` below the
    code-frequency baseline (it learnt nothing of the grids' structure), or its training NLL stopped falling."""
    reasons = []
    if not math.isfinite(val_nll) or val_nll > frequency_nll * (1 - p.min_gain):
        reasons.append(f"validation NLL {val_nll:.4f} is not train_prior.health.min_gain {p.min_gain} below the "
                       f"{frequency_nll:.4f} of the codes' own frequencies")
    if stall := stalled("NLL", train_nll, p.min_loss_drop, "train_prior.health.min_loss_drop"):
        reasons.append(stall)
    return reasons


def collapse_line(reasons: list[str], advice: str) -> str:
    """What a collapsed model's stage says in one line, as its warning or (with `health.stop`) as its error."""
    return f"the model collapsed ({'; '.join(reasons)}); {advice}"
