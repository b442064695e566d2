"""Decoder-only Transformer prior over flattened code grids (pre-LayerNorm, nanoGPT-style).

The sequence is [START, c_0, ..., c_{L-1}]; position t predicts c_t. START is token `vocab`.
A class-conditional prior (num_classes > 0) puts a class token in START's place; its last class
is the null class (no label), which classifier-free guidance samples against. A prior trained on augmented rows
(flipped images, `augmentations` > 1) adds an augmentation tag to the first position: it learns the flipped images
as their own kind and samples the original kind (tag 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PriorModelParams
from . import read_checkpoint


class KVCache:
    """Keys and values of every layer for the positions seen so far, B x heads x T x head_dim each.

    The buffers are allocated once for the whole sequence (`capacity` positions): appending by concatenation would
    copy the whole cache at every sampling step, which cost a quarter of the sampling time.
    """

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys and values after the cached ones; return all of them (views of the buffers)."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, {end} were given")
        if layer == len(self.keys):  # the first step allocates this layer's buffers
            # keys are stored head_dim x positions, so attention's q @ k^T reads the cache's slice in place (stored
            # positions x head_dim, the slice's transpose was copied at every step: a fifth of the sampling time)
            self.keys.append(k.new_empty(*k.shape[:2], k.shape[3], self.capacity).transpose(-2, -1))
            self.values.append(v.new_empty(*v.shape[:2], self.capacity, v.shape[3]))
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def attention(q, k, v, causal: bool = False, keep: torch.Tensor | None = None, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v, with a causal mask or a boolean `keep` mask, dropout on the weights.

    Spelled out as two batched products where PyTorch's kernels lose at these short sequences: one query per row
    (cached sampling: 2x the fused CPU kernel) and bf16 training on CPU (the fused kernel's backward costs ~10x its
    forward; torch's math kernel trained 1.3x faster than it, these products 1.09-1.17x faster again by skipping the
    math kernel's checks and copies; README, bf16 section). Elsewhere (fp32, full-sequence inference, GPUs) torch's
    fused kernels."""
    one_query = q.shape[2] == 1 and keep is None
    bf16_cpu_training = q.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
    if not (one_query or bf16_cpu_training):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=causal, dropout_p=dropout)
    weights = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if keep is not None:
        weights = weights.masked_fill(~keep, float("-inf"))
    weights = F.dropout(weights.softmax(-1), dropout) if dropout > 0 else weights.softmax(-1)
    return weights.to(v.dtype) @ v


class SelfAttention(nn.Module):
    def __init__(self, *, d: int, heads: int, dropout: float, attn_dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout, self.attn_dropout = heads, dropout, attn_dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        start = 0 if cache is None else cache.length
        if start > 0 and t > 1:
            raise ValueError("after the first step the KV cache takes one new position at a time")
        if cache is not None:
            k, v = cache.append(layer, k, v)
        # with cached positions the new query is the last position and may see every key: no mask needed
        causal, mask = start == 0 and t > 1, None
        if self.training and self.attn_dropout > 0 and start == 0:
            # attention dropout: hide random earlier positions from each query (softmax renormalises over the rest);
            # a query always keeps its own position, so no row is fully masked
            eye = torch.eye(t, dtype=torch.bool, device=x.device)
            keep = (torch.rand(b, self.heads, t, t, device=x.device) >= self.attn_dropout) | eye
            causal, mask = False, keep & torch.ones_like(eye).tril()
        y = attention(q, k, v, causal, mask, self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, *, d: int, heads: int, dropout: float, attn_dropout: float = 0.0):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = SelfAttention(d=d, heads=heads, dropout=dropout, attn_dropout=attn_dropout)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        x = x + self.drop(self.attn(self.ln1(x), cache, layer))
        return x + self.mlp(self.ln2(x))


class Prior(nn.Module):
    def __init__(self, p: PriorModelParams, *, vocab: int, length: int, augmentations: int = 1):
        super().__init__()
        self.config, self.vocab, self.length, self.augmentations = p, vocab, length, augmentations
        self.tok = nn.Embedding(vocab + 1, p.d_model)  # +1: the START token
        # class tokens, the last row the null class; None keeps an unconditional prior's weights as they were
        self.cls = nn.Embedding(p.num_classes + 1, p.d_model) if p.num_classes else None
        self.aug = nn.Embedding(augmentations, p.d_model) if augmentations > 1 else None  # row 0: original images
        self.pos = nn.Embedding(length, p.d_model)
        self.drop = nn.Dropout(p.dropout)
        self.blocks = nn.ModuleList(Block(d=p.d_model, heads=p.n_heads, dropout=p.dropout, attn_dropout=p.attn_dropout)
                                    for _ in range(p.n_layers))
        self.ln = nn.LayerNorm(p.d_model)
        self.head = nn.Linear(p.d_model, vocab, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The blocks' linear weights: what `train.optimizer: muon` orthogonalises (not embeddings or the head)."""
        return [m.weight for block in self.blocks for m in block.modules() if isinstance(m, nn.Linear)]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, labels: torch.Tensor | None = None,
                augmentation: torch.Tensor | None = None):
        """tokens B x T (START first at the sequence's start) -> logits B x T x vocab, and the cache.

        With a `KVCache` the tokens continue the cached positions (all at once on an empty cache, then one at a
        time) and their keys and values are added to it. `labels` (B, -1 = unknown) pick a conditional prior's class
        token; None or -1 is the null class. `augmentation` (B) tags augmented rows; None: original images (tag 0).
        """
        if labels is not None and self.cls is None:
            raise ValueError("labels given to an unconditional prior (num_classes 0)")
        start = 0 if cache is None else cache.length
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.tok(tokens)
        if start == 0 and (self.cls is not None or self.aug is not None):
            first = x[:, 0]
            if self.cls is not None:  # the class token takes START's place
                if labels is None:
                    labels = torch.full((len(tokens),), -1, dtype=torch.long, device=tokens.device)
                first = self.cls(torch.where(labels < 0, self.null_class, labels.long()))
            if self.aug is not None:
                if augmentation is None:
                    augmentation = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
                first = first + self.aug(augmentation)
            x = torch.cat([first.unsqueeze(1), x[:, 1:]], dim=1)
        x = self.drop(x + self.pos(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += tokens.shape[1]
        return self.head(self.ln(x)), cache

    def with_start(self, codes: torch.Tensor) -> torch.Tensor:
        """codes B x L -> inputs B x L ([START, c_0 .. c_{L-2}])."""
        start = torch.full((codes.shape[0], 1), self.vocab, dtype=torch.long, device=codes.device)
        return torch.cat([start, codes[:, :-1].long()], dim=1)

    def loss(self, codes: torch.Tensor, labels: torch.Tensor | None = None, augmentation: torch.Tensor | None = None):
        if labels is not None and self.training and self.config.label_dropout > 0:
            # label dropout: the null class learns the unconditional model that guidance needs
            drop = torch.rand(labels.shape, device=labels.device) < self.config.label_dropout
            labels = labels.masked_fill(drop, -1)
        inputs = self.with_start(codes)
        if self.training and self.config.token_noise > 0:
            # token noise: some input codes become random codes while the targets stay true, so the prior learns to
            # continue past its own mistakes, as it must when sampling (START keeps its place)
            noisy = torch.rand(inputs.shape, device=inputs.device) < self.config.token_noise
            noisy[:, 0] = False
            inputs = torch.where(noisy, torch.randint_like(inputs, self.vocab), inputs)
        logits, _ = self(inputs, labels=labels, augmentation=augmentation)
        logits = logits.float()
        target = codes.long()
        nll = F.cross_entropy(logits.reshape(-1, self.vocab), target.reshape(-1))
        top5 = logits.topk(5, dim=-1).indices
        stats = {
            "nll": nll.detach(),
            "top1": (top5[..., 0] == target).float().mean(),
            "top5": (top5 == target.unsqueeze(-1)).any(-1).float().mean(),
        }
        return nll, stats


def load_prior(path, device: torch.device | str = "cpu") -> tuple[Prior, dict]:
    state = read_checkpoint(path, "train_prior")
    model = Prior(PriorModelParams(**state["config"]), vocab=state["vocab"], length=state["length"],
                  augmentations=state.get("augmentations", 1))
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval(), state
