"""Vector quantiser with an EMA codebook, data-driven initialisation and dead-code restart."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed

CHUNK = 4096  # rows of distances at a time: 4096 x 512 codes stays in cache
ENTROPY_SAMPLE = 4096  # encoder outputs per step for the usage-entropy term: the batch's 25k cost ~45 % more per step


@torch.no_grad()
def nearest_centre(flat: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the closest centre for each row of `flat`, in fp32 (bf16 distances pick wrong codes near ties) and in
    chunks (a fused addmm + argmin per chunk runs ~6x faster on CPU than the whole distance matrix at once)."""
    flat, centres = flat.float(), centres.float()
    sq_norms = centres.pow(2).sum(1)
    out = torch.empty(len(flat), dtype=torch.long, device=flat.device)
    with torch.autocast(flat.device.type, enabled=False):
        for start in range(0, len(flat), CHUNK):
            # |x - e|^2 = |x|^2 - 2 x.e + |e|^2; |x|^2 is the same for every centre, so it is left out
            scores = torch.addmm(sq_norms, flat[start : start + CHUNK], centres.t(), alpha=-2)
            out[start : start + CHUNK] = scores.argmin(1)
    return out


@torch.no_grad()
def cluster_sums(flat: torch.Tensor, assign: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Count and sum of the rows assigned to each of k centres, exact in fp32 whatever the autocast (a one-hot
    matrix product would run in bf16 under autocast and round every sum)."""
    counts = torch.bincount(assign, minlength=k).to(flat.dtype)
    return counts, flat.new_zeros(k, flat.shape[1]).index_add_(0, assign, flat)


class EMAQuantizer(nn.Module):
    def __init__(self, *, codebook_size: int, dim: int, decay: float = 0.99, commitment: float = 0.25,
                 dead_code_steps: int = 50, kmeans_iters: int = 10, l2_normalize: bool = False, eps: float = 1e-5):
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.decay, self.commitment, self.dead_code_steps, self.eps = decay, commitment, dead_code_steps, eps
        self.kmeans_iters, self.l2_normalize = kmeans_iters, l2_normalize
        self.register_buffer("codebook", torch.randn(codebook_size, dim) * 0.1)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", self.codebook.clone())
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("initialised", torch.tensor(False))
        self.restarts = 0  # dead-code restarts since the counter was last read

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.l2_normalize else x

    @torch.no_grad()
    def _kmeans(self, flat: torch.Tensor) -> torch.Tensor:
        centres = flat[torch.randint(len(flat), (self.codebook_size,), device=flat.device)]
        for _ in range(self.kmeans_iters):
            assign = nearest_centre(flat, centres)
            counts, sums = cluster_sums(flat, assign, self.codebook_size)
            # an empty cluster keeps its old centre
            centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
            centres = self._norm(centres)
        return centres

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        """k-means on the first batch's encoder outputs (all ranks' shares), so every code starts where the data is."""
        centres = distributed.decided_once(flat, self._kmeans, (self.codebook_size, self.dim))
        self.codebook.copy_(centres)
        self.embed_sum.copy_(centres)
        self.cluster_size.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        counts, sums = cluster_sums(flat, codes, self.codebook_size)
        # the whole batch's counts and sums: ranks that each averaged their own would drift apart
        distributed.all_sum(counts)
        distributed.all_sum(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n  # Laplace smoothing
        self.codebook.copy_(self._norm(self.embed_sum / smoothed.unsqueeze(1)))

        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.steps_unused >= self.dead_code_steps).nonzero().squeeze(1)
        if len(dead):
            # revive unused codes on random current encoder outputs (of the whole batch, drawn once)
            picks = distributed.decided_once(flat, lambda rows: rows[torch.randint(len(rows), (len(dead),),
                                                                                   device=rows.device)], (len(dead), self.dim))
            self.codebook[dead] = picks
            self.embed_sum[dead] = picks
            self.cluster_size[dead] = 1.0
            self.steps_unused[dead] = 0
            self.restarts += len(dead)

    def forward(self, z: torch.Tensor):
        """z: N x D x H x W -> (quantised with straight-through gradient, codes N x H x W, commitment loss)."""
        n, d, h, w = z.shape
        z = self._norm(z.float().permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.training and not bool(self.initialised):
            self._init_from(flat.detach())
        codes = nearest_centre(flat.detach(), self.codebook)
        if self.training:
            self._ema_update(flat.detach(), codes)
        quantised = self.codebook[codes].view(n, h, w, d).permute(0, 3, 1, 2)
        commit = F.mse_loss(z, quantised.detach()) * self.commitment
        quantised = z + (quantised - z).detach()
        return quantised, codes.view(n, h, w), commit

    def usage_entropy_loss(self, z: torch.Tensor) -> torch.Tensor:
        """Mean entropy of each vector's soft code assignment minus the entropy of their average, on a random sample
        of the encoder outputs z (N x D x H x W). Minimising it keeps each assignment sharp while spreading the
        codes' use evenly, so the encoder moves crowded regions of its output space towards little-used codes.
        The softmax temperature is the sample's mean distance to its nearest code, so the term is scale-free."""
        flat = self._norm(z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        if len(flat) > ENTROPY_SAMPLE:
            flat = flat[torch.randint(len(flat), (ENTROPY_SAMPLE,), device=flat.device)]
        codebook = self.codebook.detach()  # the codes follow their vectors by EMA, not by this gradient
        with torch.autocast(flat.device.type, enabled=False):
            dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)).clamp(min=0)
            probs = torch.softmax(-dist / dist.min(1).values.mean().detach().clamp(min=1e-8), dim=1)
            per_vector = -(probs * probs.clamp(min=1e-12).log()).sum(1).mean()
            average = probs.mean(0)
            return per_vector + (average * average.clamp(min=1e-12).log()).sum()

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes N x H x W -> N x D x H x W."""
        return self.codebook[codes.long()].permute(0, 3, 1, 2)


def codebook_stats(counts: torch.Tensor) -> tuple[float, float]:
    """Usage (fraction of codes used at least once) and perplexity (exp of the code entropy) from code counts."""
    counts = counts.double()
    probs = counts / counts.sum()
    nz = probs[probs > 0]
    perplexity = torch.exp(-(nz * nz.log()).sum()).item()
    return (counts > 0).double().mean().item(), perplexity
