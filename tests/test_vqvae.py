"""The VQ-VAE: its evaluation over a whole set, encoder depth, shapes, losses."""
import math

import pytest
import torch

from small_params import SMALL_VQ, cpu
from vqprior.models.quantizer import codebook_stats
from vqprior.config import VQVAEHealthParams
from vqprior.health import vqvae_collapse
from vqprior.models.vqvae import VQVAE, ResBlock


def test_vqvae_evaluation_counts_codes_over_the_whole_set_not_a_batch():
    from stages.train_vqvae import evaluate_vqvae
    from vqprior.runtime import resolve_runtime
    torch.manual_seed(0)
    model = VQVAE(SMALL_VQ.model_copy(update={"codebook_size": 256})).train()
    x = torch.rand(10, 1, 28, 28) * 2 - 1
    model(x)  # k-means on these 490 encoder outputs: more codes in use than one batch of 147 can reach
    model.eval()
    out = evaluate_vqvae(model, x, 3, resolve_runtime(cpu()))  # 3+3+3+1
    recon, codes, _ = model(x)
    per_batch = max(len(codes[i : i + 3].unique()) for i in range(0, 10, 3))
    assert out["codebook_usage"] == len(codes.unique()) / 256 > per_batch / 256
    assert out["perplexity"] == pytest.approx(codebook_stats(torch.bincount(codes.flatten(), minlength=256))[1])
    mse = (((recon.clamp(-1, 1) - x) / 2) ** 2).mean().item()  # [-1, 1] -> [0, 1] units
    assert out["mse"] == pytest.approx(mse, rel=1e-5) and out["psnr"] == pytest.approx(-10 * math.log10(mse), rel=1e-6)


def test_encoder_res_blocks_set_the_encoder_depth_alone():
    def blocks(seq):
        return sum(isinstance(m, ResBlock) for m in seq)
    default = VQVAE(SMALL_VQ.model_copy(update={"res_blocks": 2}))
    light = VQVAE(SMALL_VQ.model_copy(update={"res_blocks": 2, "encoder_res_blocks": 0}))
    assert (blocks(default.encoder), blocks(default.decoder)) == (2, 2)
    assert (blocks(light.encoder), blocks(light.decoder)) == (0, 2)


def test_vqvae_shapes_and_loss_falls_on_a_small_batch():
    torch.manual_seed(0)
    model = VQVAE(SMALL_VQ, in_channels=1)
    x = torch.rand(16, 1, 28, 28) * 2 - 1
    recon, codes, _ = model(x)
    assert recon.shape == x.shape and codes.shape == (16, 7, 7) and model.grid_size(28, 28) == (7, 7)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss, stats, _ = model.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(stats["recon_loss"].item())
    assert losses[-1] < 0.6 * losses[0]
    assert model.decode(model.encode(x)).shape == x.shape


def test_l1_reconstruction_loss_is_selectable():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    model = VQVAE(SMALL_VQ.model_copy(update={"recon_loss": "l1"})).eval()
    loss, stats, _ = model.loss(x)
    recon = model(x)[0]
    assert stats["recon_loss"].item() == pytest.approx((recon - x).abs().mean().item(), rel=1e-5)
    assert stats["mse"].item() == pytest.approx(((recon - x) ** 2).mean().item() / 4, rel=1e-5)


@pytest.mark.parametrize("train_mse, stalled", [
    ([0.010, 0.004, 0.002], False),
    ([0.010, 0.0101, 0.0099], True),   # fell 1 %: not more than min_loss_drop
    ([0.010, 0.002, 0.011], True),     # fell, then rose back above the start
    ([0.010], False),                  # one epoch: nothing to compare
])
def test_a_training_mse_that_stops_falling_counts_as_collapse(train_mse, stalled):
    health = VQVAEHealthParams(min_codebook_usage=0.05, min_perplexity=2.0, min_loss_drop=0.01, stop=False)
    reasons = vqvae_collapse(0.9, 100.0, 0.001, 0.05, train_mse, health)
    assert [r.startswith("training MSE stopped falling") for r in reasons] == ([True] if stalled else [])
    healthy = vqvae_collapse(0.9, 100.0, 0.001, 0.05, [0.01, 0.001], health)
    assert healthy == [] and vqvae_collapse(0.01, 1.5, 0.06, 0.05, [0.01, 0.001], health)[2].startswith(
        "reconstruction MSE 0.06000 is no better")
