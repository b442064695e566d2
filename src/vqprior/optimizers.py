"""The optimisers the training loop builds: AdamW, or Muon on a Transformer's hidden matrices with AdamW on the rest.

Muon (Jordan et al., 2024) replaces each step of a weight matrix's Nesterov momentum by the nearest semi-orthogonal
matrix, found by a few Newton-Schulz iterations, so every direction of the update moves at the same rate: the
prior learns more per step at the same FLOPs, which is what a CPU's hour needs (docs/experiments.md). The update is
scaled to the RMS of AdamW's (0.2 sqrt(max(rows, cols)), Liu et al., 2025), so one learning rate and weight decay
serve both optimisers.

torch.optim.Muon exists but orthogonalises in bf16 whatever the hardware: on a CPU without native bf16 that emulated
arithmetic costs more than the training step itself. Here the iterations run in fp32 everywhere, which costs about
what bf16 does where bf16 is native.
"""
from __future__ import annotations

import math

import torch

from .config import TrainParams

# Quintic Newton-Schulz coefficients from Jordan's Muon: steepest at zero, so 5 steps bring every singular value
# into ~[0.7, 1.2], which trains as well as an exact orthogonalisation.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalise(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with g's singular vectors (Newton-Schulz on g / ||g||, fp32)."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    wide = x.shape[0] <= x.shape[1]
    if not wide:  # iterate on the wide orientation: the Gram matrix is the smaller side squared
        x = x.T
    x = x / x.norm().clamp(min=1e-7)  # the Frobenius norm bounds the spectral norm: the iteration needs it <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: Nesterov momentum, orthogonalised, AdamW-matched scale, decoupled weight decay."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float = 0.95):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})
        for group in self.param_groups:
            for w in group["params"]:
                if w.dim() != 2:
                    raise ValueError(f"Muon takes 2-D weight matrices only, got a {tuple(w.shape)} tensor")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, decay, mu = group["lr"], group["weight_decay"], group["momentum"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                state = self.state[w]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(w, dtype=torch.float32)
                buf = state["momentum"]
                grad = w.grad.float()
                buf.lerp_(grad, 1 - mu)
                update = orthogonalise(grad.lerp(buf, mu))  # Nesterov: the gradient pulled towards the momentum
                w.mul_(1 - lr * decay)
                w.add_(update.to(w.dtype), alpha=-lr * 0.2 * math.sqrt(max(w.shape)))


class Optimizers:
    """Several optimisers stepped as one: the training loop sets every group's lr and saves one state."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)


def adamw(weights: list[torch.nn.Parameter], p: TrainParams) -> torch.optim.AdamW:
    """Weight decay on matrices and conv kernels only; never on biases or norms."""
    decay = [w for w in weights if w.dim() >= 2]
    no_decay = [w for w in weights if w.dim() < 2]
    groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=p.lr, betas=(0.9, 0.95))


def build_optimizer(model: torch.nn.Module, p: TrainParams, kind: str = "adamw"):
    """`kind` adamw: AdamW on every weight. muon: Muon on the weights the model names in `hidden_matrices()` (the
    Transformer blocks' linear layers), AdamW on the embeddings, the output head, biases and norms."""
    weights = [w for w in model.parameters() if w.requires_grad]
    if kind == "adamw":
        return adamw(weights, p)
    if kind != "muon":
        raise ValueError(f"unknown optimizer {kind!r}: adamw | muon")
    if not hasattr(model, "hidden_matrices"):
        raise ValueError(f"optimizer muon needs a model naming its hidden matrices; {type(model).__name__} does not")
    hidden = {id(w) for w in model.hidden_matrices()}
    muon = Muon([w for w in weights if id(w) in hidden], lr=p.lr, weight_decay=p.weight_decay)
    return Optimizers(adamw([w for w in weights if id(w) not in hidden], p), muon)
