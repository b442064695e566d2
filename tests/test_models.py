import math
import re

import numpy as np
import pytest
import torch

from vqprior.config import PriorModelParams, VQVAEModelParams
from stages._cli import message as stage_line
from vqprior.errors import InputError
from vqprior.models import save_model
from vqprior.models.prior import KVCache, Prior, attention, load_prior
from vqprior.models.quantizer import EMAQuantizer, codebook_stats
from vqprior.models.vqvae import VQVAE, ResBlock, load_vqvae
from vqprior.sampling import draw, filter_logits, sample_codes

SMALL_VQ = VQVAEModelParams(channels=16, res_blocks=1, downsamples=2, codebook_size=16, code_dim=8)
SMALL_PRIOR = PriorModelParams(d_model=32, n_layers=2, n_heads=2, dropout=0.0)


def test_codebook_stats_on_hand_made_counts():
    usage, perplexity = codebook_stats(torch.tensor([5, 5, 0, 0]))
    assert usage == 0.5 and perplexity == pytest.approx(2.0)
    usage, perplexity = codebook_stats(torch.tensor([1, 1, 1, 1, 1, 1, 1, 1]))
    assert usage == 1.0 and perplexity == pytest.approx(8.0)
    _, perplexity = codebook_stats(torch.tensor([9, 1]))
    assert perplexity == pytest.approx(math.exp(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1))))


def test_vqvae_evaluation_counts_codes_over_the_whole_set_not_a_batch():
    from stages.train_vqvae import evaluate_vqvae
    from vqprior.config import ComputeParams
    from vqprior.runtime import resolve_runtime
    torch.manual_seed(0)
    model = VQVAE(SMALL_VQ.model_copy(update={"codebook_size": 256})).train()
    x = torch.rand(10, 1, 28, 28) * 2 - 1
    model(x)  # k-means on these 490 encoder outputs: more codes in use than one batch of 147 can reach
    model.eval()
    out = evaluate_vqvae(model, x, 3, resolve_runtime(ComputeParams(device="cpu", precision="fp32")))  # 3+3+3+1
    recon, codes, _ = model(x)
    per_batch = max(len(codes[i : i + 3].unique()) for i in range(0, 10, 3))
    assert out["codebook_usage"] == len(codes.unique()) / 256 > per_batch / 256
    assert out["perplexity"] == pytest.approx(codebook_stats(torch.bincount(codes.flatten(), minlength=256))[1])
    mse = (((recon.clamp(-1, 1) - x) / 2) ** 2).mean().item()  # [-1, 1] -> [0, 1] units
    assert out["mse"] == pytest.approx(mse, rel=1e-5) and out["psnr"] == pytest.approx(-10 * math.log10(mse), rel=1e-6)


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
    sampled, kmeans = EMAQuantizer(16, 4, kmeans_iters=0), EMAQuantizer(16, 4, kmeans_iters=10)
    used = {}
    for name, q in (("sampled", sampled), ("kmeans", kmeans)):
        q.train()
        q(z)
        q.eval()
        used[name] = len(q(z)[1].unique())
    assert used["kmeans"] >= 15 and used["kmeans"] >= used["sampled"]


def test_l2_normalised_lookup_keeps_unit_codes():
    torch.manual_seed(0)
    q = EMAQuantizer(8, 4, l2_normalize=True).train()
    z = torch.randn(2, 4, 3, 3) * 5
    quantised, codes, _ = q(z)
    assert torch.allclose(q.codebook.norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.allclose(quantised.norm(dim=1), torch.ones(2, 3, 3), atol=1e-5)
    flat = torch.nn.functional.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=1)
    assert torch.equal(q.eval()(z)[1].flatten(), (flat @ q.codebook.t()).argmax(1))


def test_usage_entropy_loss_on_hand_made_assignments():
    q = EMAQuantizer(4, 2).eval()
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
    q = EMAQuantizer(8, 2).eval()
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


def test_equal_models_save_to_equal_bytes(tmp_path):
    """DVC hashes checkpoints: a re-run that trains the same weights must write the same file, or every stage
    after it re-runs (torch.save names the archive inside after the random temporary file's name)."""
    torch.manual_seed(0)
    vq = VQVAE(SMALL_VQ)
    save_model(tmp_path / "a.pt", vq, in_channels=1)
    save_model(tmp_path / "b" / "vqvae.pt", vq, in_channels=1)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b" / "vqvae.pt").read_bytes()


def test_checkpoints_round_trip(tmp_path):
    vq, prior = VQVAE(SMALL_VQ), Prior(SMALL_PRIOR, vocab=16, length=49)
    save_model(tmp_path / "vq.pt", vq, in_channels=1, image_shape=[28, 28, 1])
    save_model(tmp_path / "prior.pt", prior, vocab=16, length=49, grid=[7, 7])
    vq2, _ = load_vqvae(tmp_path / "vq.pt")
    prior2, state = load_prior(tmp_path / "prior.pt")
    for before, after in ((vq, vq2), (prior, prior2)):
        a, b = before.state_dict(), after.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert state["grid"] == [7, 7] and prior2.vocab == 16 and prior2.length == 49
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        load_vqvae(tmp_path / "bad.pt")


def test_prior_is_causal():
    torch.manual_seed(0)
    prior = Prior(SMALL_PRIOR, vocab=16, length=10).eval()
    codes = torch.randint(0, 16, (2, 10))
    logits, _ = prior(prior.with_start(codes))
    changed = codes.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 16
    logits2, _ = prior(prior.with_start(changed))
    # input position 7 holds code 6, so logits at positions <= 6 cannot change
    assert torch.allclose(logits[:, :7], logits2[:, :7], atol=1e-6)
    assert not torch.allclose(logits[:, 7:], logits2[:, 7:], atol=1e-4)


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (0, 1.0), (5, 0.7)])
def test_kv_cache_gives_the_tokens_of_full_recompute(top_k, temperature):
    torch.manual_seed(0)
    prior = Prior(SMALL_PRIOR, vocab=16, length=12).eval()
    kw = dict(temperature=temperature, top_k=top_k)
    cached = sample_codes(prior, 6, generator=torch.Generator().manual_seed(3), use_cache=True, **kw)
    full = sample_codes(prior, 6, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert cached.shape == (6, 12) and torch.equal(cached, full)


def test_kv_cache_filled_several_positions_at_once_then_one_at_a_time_matches_the_full_pass():
    torch.manual_seed(0)
    prior = Prior(SMALL_PRIOR, vocab=16, length=10).eval()
    inputs = prior.with_start(torch.randint(0, 16, (3, 10)))
    expected, _ = prior(inputs)
    cache = KVCache(10)
    steps = [prior(inputs[:, :4], cache)[0]] + [prior(inputs[:, t : t + 1], cache)[0] for t in range(4, 10)]
    assert cache.length == 10
    assert torch.allclose(torch.cat(steps, 1), expected, atol=1e-5)
    cache = KVCache(10)
    prior(inputs[:, :3], cache)
    with pytest.raises(ValueError, match="one new position at a time"):
        prior(inputs[:, 3:5], cache)


def test_attention_dropout_masks_while_training_only():
    torch.manual_seed(0)
    prior = Prior(SMALL_PRIOR.model_copy(update={"attn_dropout": 0.9}), vocab=16, length=10)
    codes = torch.randint(0, 16, (4, 10))
    inputs = prior.with_start(codes)
    plain = Prior(SMALL_PRIOR, vocab=16, length=10)
    plain.load_state_dict(prior.state_dict())
    expected = plain.eval()(inputs)[0]
    prior.train()
    a, b = prior(inputs)[0], prior(inputs)[0]
    # random masks: two training passes differ, and neither is the unmasked output; no query loses every key
    assert torch.isfinite(a).all() and torch.isfinite(prior.loss(codes)[0])
    assert not torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, expected, atol=1e-4)
    assert torch.allclose(a[:, 0], expected[:, 0], atol=1e-6)  # the first query sees only itself: nothing to mask
    # one token at a time with the KV cache: no mask, even in training mode
    cache, steps = KVCache(10), []
    for t in range(10):
        logits, _ = prior(inputs[:, t : t + 1], cache)
        steps.append(logits)
    assert torch.allclose(torch.cat(steps, 1), expected, atol=1e-5)
    prior.eval()
    assert torch.allclose(prior(inputs)[0], expected, atol=1e-6)


def test_token_noise_replaces_input_codes_while_training_only():
    torch.manual_seed(0)
    prior = Prior(SMALL_PRIOR.model_copy(update={"token_noise": 0.5}), vocab=16, length=10)
    codes = torch.randint(0, 16, (400, 10))
    seen, forward = [], prior.forward
    prior.forward = lambda tokens, **kw: (seen.append(tokens), forward(tokens, **kw))[1]
    prior.train().loss(codes)
    prior.eval().loss(codes)
    clean = prior.with_start(codes)
    noisy, changed = seen[0], seen[0] != clean
    assert torch.equal(noisy[:, 0], clean[:, 0]) and noisy[:, 1:].max() < 16  # START stays; noise is real codes
    # half the codes are redrawn, and a redrawn code is a different one 15 times in 16
    assert changed[:, 1:].float().mean().item() == pytest.approx(0.5 * 15 / 16, abs=0.03)
    assert torch.equal(seen[1], clean)  # evaluation sees the true codes


@pytest.mark.parametrize("mask", ["causal", "keep"])
def test_spelled_out_bf16_training_attention_matches_torchs_kernel(mask):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8).bfloat16().float().requires_grad_() for _ in range(3))
    keep = (torch.rand(2, 3, 7, 7) > 0.5) | torch.eye(7, dtype=torch.bool)
    causal, keep = (True, None) if mask == "causal" else (False, keep)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=causal)
    (grad_expected,) = torch.autograd.grad(expected.sum(), q)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 training on CPU takes the spelled-out path
        out = attention(q, k, v, causal, keep)
    (grad,) = torch.autograd.grad(out.float().sum(), q)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, atol=0.03) and torch.allclose(grad, grad_expected, atol=0.05)
    if causal:  # the first query sees only the first key
        assert torch.allclose(out[:, :, 0].float(), v[:, :, 0], atol=0.02)


COND_PRIOR = SMALL_PRIOR.model_copy(update={"num_classes": 3, "label_dropout": 0.0})


def test_class_token_conditions_the_logits():
    torch.manual_seed(0)
    prior = Prior(COND_PRIOR, vocab=16, length=10).eval()
    codes = torch.randint(0, 16, (2, 10)).repeat(2, 1)
    logits, _ = prior(prior.with_start(codes), labels=torch.tensor([0, 0, 1, 1]))
    assert not torch.allclose(logits[:2], logits[2:], atol=1e-4)
    # no label, -1 and the null class's index are the same (unconditional) token
    null, _ = prior(prior.with_start(codes))
    unknown, _ = prior(prior.with_start(codes), labels=torch.full((4,), -1))
    explicit, _ = prior(prior.with_start(codes), labels=torch.full((4,), prior.null_class))
    assert prior.null_class == 3 and torch.equal(null, unknown) and torch.equal(null, explicit)
    with pytest.raises(ValueError, match="unconditional"):
        Prior(SMALL_PRIOR, vocab=16, length=10)(prior.with_start(codes), labels=torch.zeros(4, dtype=torch.long))


def test_label_dropout_one_trains_the_null_class_only():
    torch.manual_seed(0)
    codes, labels = torch.randint(0, 16, (4, 10)), torch.tensor([0, 1, 2, 0])
    prior = Prior(COND_PRIOR.model_copy(update={"label_dropout": 1.0}), vocab=16, length=10).train()
    dropped, _ = prior.loss(codes, labels)
    assert dropped.item() == pytest.approx(prior.loss(codes)[0].item(), abs=1e-6)  # None = the null class
    kept, _ = prior.eval().loss(codes, labels)  # no label dropout in eval
    assert kept.item() != pytest.approx(dropped.item(), abs=1e-4)


def test_conditional_prior_checkpoint_needs_no_params(tmp_path):
    torch.manual_seed(0)
    prior = Prior(COND_PRIOR, vocab=16, length=10).eval()
    save_model(tmp_path / "prior.pt", prior, vocab=16, length=10, grid=[2, 5])
    loaded, _ = load_prior(tmp_path / "prior.pt")
    inputs, labels = prior.with_start(torch.randint(0, 16, (3, 10))), torch.tensor([2, 1, 0])
    assert loaded.num_classes == 3 and torch.equal(loaded(inputs, labels=labels)[0], prior(inputs, labels=labels)[0])


def test_augmentation_tag_marks_flipped_rows_and_sampling_draws_originals(tmp_path):
    torch.manual_seed(0)
    prior = Prior(COND_PRIOR, vocab=16, length=10, augmentations=2).eval()
    codes, labels = torch.randint(0, 16, (3, 10)), torch.tensor([0, 1, 2])
    inputs = prior.with_start(codes)
    original, _ = prior(inputs, labels=labels)
    flipped, _ = prior(inputs, labels=labels, augmentation=torch.ones(3, dtype=torch.long))
    assert not torch.allclose(original, flipped, atol=1e-4)  # the tag reaches every position's logits
    assert torch.equal(original, prior(inputs, labels=labels, augmentation=torch.zeros(3, dtype=torch.long))[0])
    # the cached path (sampling) uses tag 0 too: KV-cache logits equal the full pass without a tag
    cache = KVCache(10)
    first, _ = prior(inputs[:, :1], cache, labels=labels)
    assert torch.allclose(first[:, 0], original[:, 0], atol=1e-5)
    save_model(tmp_path / "prior.pt", prior, vocab=16, length=10, grid=[2, 5], augmentations=2)
    loaded, _ = load_prior(tmp_path / "prior.pt")
    assert loaded.augmentations == 2 and torch.equal(loaded(inputs, labels=labels)[0], original)
    # a prior without augmented rows has no tag embedding: its parameters are as before
    assert Prior(COND_PRIOR, vocab=16, length=10).aug is None


def test_guidance_one_is_plain_conditional_and_zero_is_unconditional():
    torch.manual_seed(0)
    prior = Prior(COND_PRIOR, vocab=16, length=8).eval()
    with torch.no_grad():  # at init (std 0.02) the class tokens move the logits too little to change a draw
        prior.cls.weight.mul_(50)
    labels = torch.tensor([0, 1, 2, 0, 1])

    def draw(**kw):
        return sample_codes(prior, 5, generator=torch.Generator().manual_seed(4), **kw)

    conditional = draw(labels=labels)
    assert torch.equal(draw(labels=labels, guidance=1.0), conditional)
    assert not torch.equal(conditional, draw())  # the labels are used at the default guidance
    # guidance 0 runs the batched 2n path and keeps only its null-class half: plain unconditional sampling
    assert torch.equal(draw(labels=labels, guidance=0.0), draw())
    assert not torch.equal(draw(labels=labels, guidance=3.0), conditional)
    # an unconditional prior ignores guidance
    plain = Prior(SMALL_PRIOR, vocab=16, length=8).eval()
    assert torch.equal(sample_codes(plain, 5, generator=torch.Generator().manual_seed(4), guidance=3.0),
                       sample_codes(plain, 5, generator=torch.Generator().manual_seed(4)))


def test_guided_greedy_sampling_follows_the_mixed_logits():
    torch.manual_seed(0)
    prior = Prior(COND_PRIOR, vocab=16, length=8).eval()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    guided = sample_codes(prior, 6, labels=labels, guidance=2.5, top_k=1)
    # greedy by hand: argmax of uncond + 2.5 * (cond - uncond), the two passes run separately
    seq = torch.full((6, 1), 16)
    for _ in range(8):
        cond, uncond = prior(seq, labels=labels)[0][:, -1], prior(seq)[0][:, -1]
        seq = torch.cat([seq, (uncond + 2.5 * (cond - uncond)).argmax(-1, keepdim=True)], 1)
    assert torch.equal(guided, seq[:, 1:])
    plain = sample_codes(prior, 6, labels=labels, top_k=1)  # guidance 1: greedy on the conditional logits alone
    seq = torch.full((6, 1), 16)
    for _ in range(8):
        seq = torch.cat([seq, prior(seq, labels=labels)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(plain, seq[:, 1:]) and not torch.equal(guided, plain)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_kv_cache_gives_the_tokens_of_full_recompute_with_labels(guidance):
    torch.manual_seed(0)
    prior = Prior(COND_PRIOR, vocab=16, length=12).eval()
    kw = dict(labels=torch.tensor([0, 1, 2, 0, 1, 2]), guidance=guidance, temperature=0.9)
    cached = sample_codes(prior, 6, generator=torch.Generator().manual_seed(3), use_cache=True, **kw)
    full = sample_codes(prior, 6, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert cached.shape == (6, 12) and torch.equal(cached, full)


def test_top_k_one_is_greedy_and_deterministic():
    torch.manual_seed(0)
    prior = Prior(SMALL_PRIOR, vocab=16, length=8).eval()
    a = sample_codes(prior, 4, top_k=1, generator=torch.Generator().manual_seed(1))
    b = sample_codes(prior, 4, top_k=1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    # greedy by hand: argmax at every step
    seq = torch.full((4, 1), 16)
    for _ in range(8):
        seq = torch.cat([seq, prior(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(a, seq[:, 1:])


def test_top_p_keeps_the_smallest_set_with_enough_mass():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.75))
    assert kept.tolist() == [[True, True, False, False, False]]
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.79))
    assert kept.tolist() == [[True, True, False, False, False]]
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.81))
    assert kept.tolist() == [[True, True, True, False, False]]
    shuffled = torch.tensor([[0.1, 0.5, 0.04, 0.3, 0.06]]).log()
    assert torch.isfinite(filter_logits(shuffled, top_p=0.75)).tolist() == [[False, True, False, True, False]]
    assert torch.isfinite(filter_logits(shuffled, top_k=3)).sum() == 3


def test_draw_follows_the_probabilities_and_skips_zero_ones():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0]).expand(20000, -1)
    tokens = draw(probs, torch.Generator().manual_seed(0)).squeeze(1)
    freq = torch.bincount(tokens, minlength=6).float() / len(tokens)
    assert freq[[0, 2, 5]].sum() == 0  # zero-probability tokens, also the last one, never come up
    assert torch.allclose(freq[[1, 3, 4]], torch.tensor([0.5, 0.3, 0.2]), atol=0.015)  # ~4 standard errors
    one_hot = torch.eye(6)[[5, 0, 3]]
    assert draw(one_hot).squeeze(1).tolist() == [5, 0, 3]


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    cold = filter_logits(logits, temperature=0.5).softmax(-1)
    hot = filter_logits(logits, temperature=2.0).softmax(-1)
    assert cold[0, 0] > logits.softmax(-1)[0, 0] > hot[0, 0]


def test_prior_and_vqvae_from_different_runs_are_refused(tmp_path):
    from vqprior.data.images import file_sha256
    from vqprior.sampling import load_generator
    vq, prior = tmp_path / "vq.pt", tmp_path / "prior.pt"
    save_model(vq, VQVAE(SMALL_VQ), in_channels=1, image_shape=[28, 28, 1])
    save_model(prior, Prior(SMALL_PRIOR, vocab=16, length=49), vocab=16, length=49, grid=[7, 7], vqvae_sha256=file_sha256(vq))
    assert load_generator(prior, vq, "cpu")[0].vocab == 16  # the matching pair loads
    message = f"error: {prior} was trained on the codes of another {vq}; re-run `dvc repro train_prior`"
    save_model(vq, VQVAE(SMALL_VQ), in_channels=1, image_shape=[28, 28, 1])  # the VQ-VAE retrained, the prior not
    with pytest.raises(InputError) as info:
        load_generator(prior, vq, "cpu")
    assert stage_line(info.value) == message
    save_model(prior, Prior(SMALL_PRIOR, vocab=32, length=49), vocab=32, length=49, grid=[7, 7])  # no hash, other vocab
    with pytest.raises(InputError) as info:
        load_generator(prior, vq, "cpu")
    assert stage_line(info.value) == message
