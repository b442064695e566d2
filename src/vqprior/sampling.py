"""Autoregressive sampling of code grids: temperature, top-k, top-p, classifier-free guidance, batched, with a KV cache."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .io import file_hash
from .errors import InputError
from .models.prior import KVCache, Prior, load_prior
from .models.vqvae import VQVAE, load_vqvae
from .runtime import Runtime


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Scale by 1/temperature, then keep the top-k tokens and the smallest set with mass >= top_p."""
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of B x V probabilities (B x 1), by inverting the CDF with one uniform number per row.

    torch.multinomial draws an exponential number per token: 10 % of the sampling time at 512 codes.
    """
    cdf = probs.cumsum(-1)
    u = torch.rand(len(probs), 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    # the first token whose CDF exceeds u skips zero-probability tokens; should rounding put u at the total mass,
    # the last token with probability > 0 is taken
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(-1, keepdim=True)
    return torch.minimum(torch.searchsorted(cdf, u, right=True), last)


@torch.no_grad()
def sample_codes(prior: Prior, n: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 labels: torch.Tensor | None = None, guidance: float = 1.0) -> torch.Tensor:
    """Return n x L code sequences. `use_cache=False` recomputes the whole prefix each step (for checks).

    A conditional prior samples class `labels` (n; None: the null class, i.e. unconditionally). With guidance != 1
    each step runs the conditional and the null-class rows as one batch of 2n and mixes their logits
    (classifier-free guidance): uncond + guidance * (cond - uncond). An unconditional prior ignores guidance.
    """
    prior.eval()
    device = next(prior.parameters()).device
    guided = labels is not None and guidance != 1.0  # guidance 1 is plain conditional: skip the null-class half
    if labels is not None:
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} samples")
        labels = labels.to(device)
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, prior.null_class)])
    seq = torch.full((2 * n if guided else n, 1), prior.vocab, dtype=torch.long, device=device)  # START
    cache = KVCache(prior.length) if use_cache else None
    for _ in range(prior.length):
        if use_cache:
            logits, _ = prior(seq[:, -1:], cache, labels=labels)
        else:
            logits, _ = prior(seq, labels=labels)
        logits = logits[:, -1].float()
        if guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + guidance * (cond - uncond)
        nxt = draw(filter_logits(logits, temperature, top_k, top_p).softmax(-1), generator)
        seq = torch.cat([seq, nxt.repeat(2, 1) if guided else nxt], dim=1)  # both halves continue the same codes
    return seq[:n, 1:]


def sample_in_batches(prior: Prior, n: int, batch_size: int, seed: int, labels: torch.Tensor | None = None,
                      **kwargs) -> torch.Tensor:
    device = next(prior.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    with tqdm(total=n, desc="sample", unit="img", disable=None) as bar:
        for start in range(0, n, batch_size):
            size = min(batch_size, n - start)
            batch_labels = None if labels is None else labels[start : start + size]
            out.append(sample_codes(prior, size, generator=generator, labels=batch_labels, **kwargs).cpu())
            bar.update(len(out[-1]))
    return torch.cat(out)


def load_generator(prior_path: str, vqvae_path: str, device) -> tuple[Prior, dict, VQVAE]:
    """The prior, its checkpoint dict and the VQ-VAE whose codes it was trained on. A pair from different runs (the
    VQ-VAE retrained, the prior not) would decode garbage, so it stops with one line."""
    prior, state = load_prior(prior_path, device)
    vqvae, _ = load_vqvae(vqvae_path, device)
    trained_on = state.get("vqvae_sha256")  # train_prior records the hash of the VQ-VAE that made its codes
    if (trained_on is not None and trained_on != file_hash(vqvae_path)) or prior.vocab != vqvae.config.codebook_size:
        raise InputError(prior_path, "train_prior", f"was trained on the codes of another {vqvae_path}")
    return prior, state, vqvae


@dataclass
class Generated:
    images: torch.Tensor  # uint8 N x C x H x W
    codes: torch.Tensor  # N x grid_h x grid_w
    labels: torch.Tensor | None  # the class of each sample (conditional prior), else None
    seconds: float  # drawing the codes, decoding excluded


def generate(prior: Prior, vqvae: VQVAE, grid: tuple[int, int], runtime: Runtime, *, num_samples: int,
             batch_size: int, seed: int, guidance: float = 1.0, **filters) -> Generated:
    """Sample code grids and decode them to images. A conditional prior gets its classes spread evenly
    (sample i is class i % num_classes), so every class is equally represented at any num_samples."""
    classes = prior.num_classes
    labels = torch.arange(num_samples) % classes if classes else None
    t0 = time.perf_counter()
    with runtime.autocast():
        codes = sample_in_batches(prior, num_samples, batch_size, seed, labels=labels, guidance=guidance, **filters)
    seconds = time.perf_counter() - t0
    codes = codes.view(-1, *grid)
    images = []
    for start in range(0, len(codes), batch_size):
        with runtime.autocast():
            images.append(vqvae.normalisation.to_uint8(vqvae.decode(codes[start : start + batch_size].to(runtime.device))).cpu())
    return Generated(torch.cat(images), codes, labels, seconds)
