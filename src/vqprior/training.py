"""One training loop for every model: warm-up + cosine LR, clipping, bf16 autocast, early stopping,
an atomic checkpoint each epoch and resume from it, and a clear stop on a NaN loss."""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from . import distributed
from .config import TrainParams
from .errors import InputError, ParamsError, TrainingError
from .models import load_state, save_state
from .optimizers import build_optimizer
from .runtime import Runtime


class TrainingDiverged(TrainingError):
    """The loss or a validation metric went non-finite."""


def fingerprint(*parts) -> str:
    """A short hash of params and input hashes: what a checkpoint must match to be resumed."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def non_finite_terms(stats: dict) -> str:
    """', the non-finite term: commit_loss' for the loss terms among a step's stats that are not finite (the sum alone
    does not say whether the learning rate or one term's weight is at fault), else ''."""
    bad = [k for k, v in stats.items() if not math.isfinite(float(v))]
    return f" (non-finite: {', '.join(bad)})" if bad else ""


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)
    epochs: int = 0
    seconds: float = 0.0
    stopped_early: bool = False


def batches(n: int, batch_size: int, seed: int, epoch: int):
    """Shuffled index batches; the order depends only on (seed, epoch), so a resumed run sees the same batches."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
        yield order[start : start + batch_size]


def fit(
    model: torch.nn.Module,
    train_size: int,
    train_step: Callable[[torch.Tensor], tuple[torch.Tensor, dict]],
    evaluate: Callable[[], dict],
    p: TrainParams,
    runtime: Runtime,
    seed: int,
    checkpoint: Path,
    monitor: str,
    on_epoch: Callable[[int, dict], None] = lambda epoch, metrics: None,
    desc: str = "train",
    fingerprint: str = "",
    optimizer: str = "adamw",
) -> FitResult:
    """Train `model`; `train_step(index_batch)` returns (loss, stats) and `evaluate()` returns val metrics.

    The best weights (lowest `monitor`) are restored into `model` at the end. A checkpoint is resumed only
    if its `fingerprint` (a hash of the params and inputs) matches, so a crashed run with other params is
    never continued by mistake.

    Under several ranks (vqprior.distributed) each rank steps on its share of every batch of the one schedule, the
    gradients, the loss and the stats are the whole batch's, `evaluate()` must return whole-set metrics (each rank
    scoring its share), and rank 0 alone prints, calls `on_epoch` and writes the checkpoint.
    `optimizer`: adamw, or muon for a model with `hidden_matrices()` (vqprior.optimizers).
    """
    if p.batch_size < distributed.world():
        raise ParamsError(f"{desc}: train.batch_size {p.batch_size} is smaller than compute.procs {distributed.world()}; "
                          "every process needs at least one example of each batch")
    opt = build_optimizer(model, p, optimizer)
    steps_per_epoch = max(1, train_size // p.batch_size)
    total = steps_per_epoch * p.epochs
    result, best_state, bad_epochs, start_epoch = FitResult(), None, 0, 0
    try:  # writes are atomic, so only a damaged disk or a foreign (or hostile) file fails here
        state = load_state(checkpoint, desc) if checkpoint.exists() else None
    except InputError as exc:
        raise TrainingError(f"{desc}: {checkpoint} {exc.problem}; delete it to train from the start") from None
    main = distributed.is_main()
    if state is not None and state.get("fingerprint") != fingerprint:
        if main:
            print(f"{desc}: ignoring {checkpoint}: it was written with other params or inputs")
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        # each rank's own generator (dropout, flips); the fingerprint holds compute.procs, so the count matches
        torch.set_rng_state(state.get("torch_rng_ranks", [state["torch_rng"]])[distributed.rank()])
        result.history, result.best, bad_epochs = state["history"], state["best"], state["bad_epochs"]
        best_state, start_epoch = state["best_model"], state["epoch"]
        result.seconds = state["seconds"]
        if main:
            print(f"{desc}: resuming from {checkpoint} after epoch {start_epoch}")
    elif distributed.world() > 1:
        distributed.sync_model(model)  # equal weights on every rank, as DDP starts
        if not main:  # rank 0 draws what one process would; the others' flips and dropout must differ from its
            torch.manual_seed(torch.initial_seed() + 7919 * distributed.rank())

    for epoch in range(start_epoch, p.epochs):
        if bad_epochs >= p.patience:
            break
        t0 = time.perf_counter()
        model.train()
        sums: dict[str, float] = {}
        bar = tqdm(batches(train_size, p.batch_size, seed, epoch), total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{p.epochs}",
                   leave=False, disable=None if main else True, dynamic_ncols=True)
        for i, idx in enumerate(bar):
            part = idx[distributed.share(len(idx))]
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = p.lr * lr_factor(step, total, p.warmup_steps)
            with runtime.autocast():
                loss, stats = train_step(part)
            if distributed.world() > 1:  # the whole batch's loss and stats: each share's mean weighted by its size
                weight = len(part) / len(idx)
                total_loss, *values = distributed.all_sum_floats(*(float(v) * weight for v in (loss.detach(), *stats.values())))
                loss_value, stats = torch.tensor(total_loss), dict(zip(stats, values))
            else:
                loss_value = loss
            if not torch.isfinite(loss_value):
                raise TrainingDiverged(
                    f"{desc}: loss is {loss_value.item()} at epoch {epoch + 1}, step {i}{non_finite_terms(stats)}; the last "
                    f"good checkpoint is kept at {checkpoint if checkpoint.exists() else '(none yet)'}; "
                    + ("lower that term's weight or train.lr" if non_finite_terms(stats) else "lower train.lr or train.grad_clip")
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(model, len(part) / len(idx))
            if p.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
            opt.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if i % 20 == 0:
                bar.set_postfix(loss=f"{loss_value.item():.4f}")
        model.eval()
        distributed.sync_buffers(model)
        with torch.no_grad(), runtime.autocast():
            val = evaluate()
        if not math.isfinite(val[monitor]):  # a NaN would never compare as worse and could become the "best" epoch
            raise TrainingDiverged(
                f"{desc}: validation {monitor} is {val[monitor]} after epoch {epoch + 1}; the last good checkpoint is kept "
                f"at {checkpoint if checkpoint.exists() else '(none yet)'}; lower train.lr or train.grad_clip"
            )
        metrics = {f"train_{k}": v / steps_per_epoch for k, v in sums.items()}
        metrics.update({f"val_{k}": v for k, v in val.items()})
        metrics["lr"] = opt.param_groups[0]["lr"]
        result.seconds += time.perf_counter() - t0
        metrics["epoch_seconds"] = time.perf_counter() - t0
        result.history.append(metrics)
        improved = not result.best or metrics[f"val_{monitor}"] < result.best[f"val_{monitor}"]
        if improved:
            result.best, bad_epochs = dict(metrics, epoch=epoch + 1), 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        rng = {"torch_rng": torch.get_rng_state()}
        if distributed.world() > 1:
            rng["torch_rng_ranks"] = distributed.all_gather_object(rng["torch_rng"])
        if not main:
            continue
        shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch_seconds")
        print(f"{desc} epoch {epoch + 1}/{p.epochs}  {shown}  ({metrics['epoch_seconds']:.0f}s)", flush=True)
        on_epoch(epoch + 1, metrics)
        save_state({
            "model": model.state_dict(), "optimizer": opt.state_dict(), **rng,
            "history": result.history, "best": result.best, "bad_epochs": bad_epochs,
            "best_model": best_state, "epoch": epoch + 1, "seconds": result.seconds, "fingerprint": fingerprint,
        }, checkpoint)
    if bad_epochs >= p.patience and len(result.history) < p.epochs:
        result.stopped_early = True
    if best_state is not None:
        model.load_state_dict(best_state)
    result.epochs = len(result.history)
    return result
