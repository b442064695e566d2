"""Convolutional VQ-VAE: strided-conv encoder, EMA quantiser, transposed-conv decoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VQVAEModelParams
from ..data.images import Normalisation
from . import read_checkpoint
from .quantizer import EMAQuantizer


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels), nn.GELU(), nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x):
        return x + self.block(x)


class VQVAE(nn.Module):
    def __init__(self, p: VQVAEModelParams, *, in_channels: int = 1, normalisation: Normalisation = Normalisation()):
        super().__init__()
        self.config = p
        self.normalisation = normalisation  # how pixels became inputs; decoding to pixels inverts it
        c = p.channels
        widths = p.widths  # e.g. 48, 96
        enc, prev = [], in_channels
        for w in widths:
            enc += [nn.Conv2d(prev, w, 4, stride=2, padding=1), nn.GroupNorm(8, w), nn.GELU()]
            prev = w
        encoder_blocks = p.res_blocks if p.encoder_res_blocks is None else p.encoder_res_blocks
        enc += [nn.Conv2d(prev, c, 3, padding=1)] + [ResBlock(c) for _ in range(encoder_blocks)]
        enc += [nn.GELU(), nn.Conv2d(c, p.code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.quantizer = EMAQuantizer(codebook_size=p.codebook_size, dim=p.code_dim, decay=p.ema_decay,
                                      commitment=p.commitment, dead_code_steps=p.dead_code_steps,
                                      kmeans_iters=p.kmeans_iters, l2_normalize=p.l2_normalize)
        dec = [nn.Conv2d(p.code_dim, c, 3, padding=1)] + [ResBlock(c) for _ in range(p.res_blocks)] + [nn.GELU()]
        prev = c
        for w in reversed(widths):
            dec += [nn.ConvTranspose2d(prev, w, 4, stride=2, padding=1), nn.GroupNorm(8, w), nn.GELU()]
            prev = w
        dec += [nn.Conv2d(prev, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        f = 2 ** self.config.downsamples
        return height // f, width // f

    def forward(self, x: torch.Tensor):
        z = self.encoder(x)
        q, codes, commit = self.quantizer(z)
        recon = self.decoder(q)
        return recon, codes, commit

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(self.encoder(x))[1]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantizer.lookup(codes))

    def loss(self, x: torch.Tensor):
        z = self.encoder(x)
        q, codes, commit = self.quantizer(z)
        recon = self.decoder(q).float()
        rec = F.mse_loss(recon, x) if self.config.recon_loss == "mse" else F.l1_loss(recon, x)
        with torch.no_grad():  # reported in [0, 1] pixel units, whatever the normalisation
            to_unit = self.normalisation.to_unit
            mse = F.mse_loss(to_unit(recon), to_unit(x))
        stats = {"recon_loss": rec.detach(), "commit_loss": commit.detach(), "mse": mse}
        loss = rec + commit
        if self.config.usage_entropy > 0:
            entropy = self.quantizer.usage_entropy_loss(z)
            loss = loss + self.config.usage_entropy * entropy
            stats["usage_entropy_loss"] = entropy.detach()
        return loss, stats, codes


def load_vqvae(path, device: torch.device | str = "cpu") -> tuple[VQVAE, dict]:
    state = read_checkpoint(path, "train_vqvae")
    model = VQVAE(VQVAEModelParams(**state["config"]), in_channels=state["in_channels"],
                  normalisation=Normalisation.from_dict(state.get("normalisation")))
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval(), state
