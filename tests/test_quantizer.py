"""The EMA quantiser: code statistics, data-driven initialisation, lookups, the usage-entropy loss, dead-code restarts."""
import math

import pytest
import torch

from vqprior.models.quantizer import EMAQuantizer, codebook_stats


def test_codebook_stats_on_hand_made_counts():
    usage, perplexity = codebook_stats(torch.tensor([5, 5, 0, 0]))
    assert usage == 0.5 and perplexity == pytest.approx(2.0)
    usage, perplexity = codebook_stats(torch.tensor([1, 1, 1, 1, 1, 1, 1, 1]))
    assert usage == 1.0 and perplexity == pytest.approx(8.0)
    _, perplexity = codebook_stats(torch.tensor([9, 1]))
    assert perplexity == pytest.approx(math.exp(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1))))


def test_quantizer_initialises_from_data_and_snaps_to_nearest():
    torch.manual_seed(0)
    q = EMAQuantizer(codebook_size=32, dim=4)
    z = torch.randn(8, 4, 4, 4) * 3 + 10  # far from the random initial codebook
    q.train()
    _, codes, _ = q(z)
    assert bool(q.initialised)
    assert len(codes.unique()) > 16  # started on data, so most codes are in use at once
    q.eval()
    quantised, codes, commit = q(z)
    assert quantised.shape == z.shape and codes.shape == (8, 4, 4)
    assert commit.item() == pytest.approx(0.25 * torch.nn.functional.mse_loss(z, quantised).item(), rel=1e-5)
    assert commit.item() > 0  # the data are not all on codes
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    brute = torch.cdist(flat, q.codebook).argmin(1)
    assert torch.equal(codes.flatten(), brute)


def test_kmeans_init_spreads_codes_over_clustered_data():
    torch.manual_seed(0)
    centres = torch.randn(16, 4) * 10
    z = (centres[torch.arange(16).repeat(8)] + 0.1 * torch.randn(128, 4)).view(2, 8, 8, 4).permute(0, 3, 1, 2)
    sampled, kmeans = (EMAQuantizer(codebook_size=16, dim=4, kmeans_iters=0),
                       EMAQuantizer(codebook_size=16, dim=4, kmeans_iters=10))
    used = {}
    for name, q in (("sampled", sampled), ("kmeans", kmeans)):
        q.train()
        q(z)
        q.eval()
        used[name] = len(q(z)[1].unique())
    assert used["kmeans"] >= 15 and used["kmeans"] >= used["sampled"]


def test_l2_normalised_lookup_keeps_unit_codes():
    torch.manual_seed(0)
    q = EMAQuantizer(codebook_size=8, dim=4, l2_normalize=True).train()
    z = torch.randn(2, 4, 3, 3) * 5
    quantised, codes, _ = q(z)
    assert torch.allclose(q.codebook.norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.allclose(quantised.norm(dim=1), torch.ones(2, 3, 3), atol=1e-5)
    flat = torch.nn.functional.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=1)
    assert torch.equal(q.eval()(z)[1].flatten(), (flat @ q.codebook.t()).argmax(1))


def test_usage_entropy_loss_on_hand_made_assignments():
    q = EMAQuantizer(codebook_size=4, dim=2).eval()
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    near = torch.tensor([[0.1, 0.0], [10.0, 0.1], [0.0, 9.9], [9.9, 10.0]])  # each 0.1 from its own code
    as_map = lambda rows: rows.t().reshape(1, 2, 1, -1)  # N x D x H x W with one row of vectors
    # softmax temperature = mean nearest distance (0.01): assignments are one-hot to float precision
    assert q.usage_entropy_loss(as_map(near)).item() == pytest.approx(-math.log(4), abs=1e-4)  # all four codes used
    assert q.usage_entropy_loss(as_map(near[:1].repeat(4, 1))).item() == pytest.approx(0.0, abs=1e-4)  # one code
    halfway = torch.tensor([[5.0, 0.0]])  # as near code 0 as code 1: a 50/50 assignment, entropy ln 2 both ways
    assert q.usage_entropy_loss(as_map(halfway)).item() == pytest.approx(0.0, abs=1e-4)


def test_usage_entropy_loss_moves_crowded_vectors_to_idle_codes():
    torch.manual_seed(0)
    q = EMAQuantizer(codebook_size=8, dim=2).eval()
    q.codebook.copy_(torch.randn(8, 2))
    z = (q.codebook[0] + 0.3 * torch.randn(64, 2)).t().reshape(1, 2, 8, 8).requires_grad_()  # most near code 0
    perplexity = lambda: codebook_stats(torch.bincount(q(z.detach())[1].flatten(), minlength=8))[1]
    before = perplexity()
    opt = torch.optim.SGD([z], lr=20.0)
    for _ in range(100):
        opt.zero_grad()
        q.usage_entropy_loss(z).backward()
        opt.step()
    assert before < 1.1 and perplexity() > 2 * before  # the vectors now spread over two or more codes


def test_dead_code_is_restarted_on_encoder_outputs():
    torch.manual_seed(0)
    q = EMAQuantizer(codebook_size=8, dim=2, dead_code_steps=3)
    q.train()
    z = torch.randn(4, 2, 2, 2)
    q(z)
    q.codebook[5] = 1e6  # kill code 5: it is never nearest to anything
    q.embed_sum[5] = 1e6
    for _ in range(3):
        q(z)
    assert q.restarts >= 1 and q.steps_unused[5] == 0
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    assert (flat == q.codebook[5]).all(1).any()  # moved onto one of the encoder outputs


def test_ema_update_sums_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    q = EMAQuantizer(codebook_size=16, dim=4, decay=0.99).train()
    q(torch.randn(8, 4, 5, 5))  # k-means initialisation
    embed_sum = q.embed_sum.clone()
    z = torch.randn(8, 4, 5, 5) * 3.7
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, codes, _ = q(z)
    flat, codes = z.permute(0, 2, 3, 1).reshape(-1, 4).double(), codes.flatten()
    sums = torch.stack([flat[codes == k].sum(0) for k in range(16)]).float()
    # a bf16 product would round each sum to ~3 significant digits (errors ~1e-2 here, 1e-4 after the decay)
    assert torch.allclose(q.embed_sum, 0.99 * embed_sum + 0.01 * sums, rtol=0, atol=2e-6)
