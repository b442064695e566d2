"""Sampling codes from the prior: KV cache against full recompute, guidance, top-k, top-p, temperature, draws."""
import pytest
import torch

from small_params import SMALL_PRIOR
from vqprior.models.prior import Prior
from vqprior.sampling import draw, filter_logits, sample_codes


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (0, 1.0), (5, 0.7)])
def test_kv_cache_gives_the_tokens_of_full_recompute(top_k, temperature):
    torch.manual_seed(0)
    prior = Prior(SMALL_PRIOR, vocab=16, length=12).eval()
    kw = dict(temperature=temperature, top_k=top_k)
    cached = sample_codes(prior, 6, generator=torch.Generator().manual_seed(3), use_cache=True, **kw)
    full = sample_codes(prior, 6, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert cached.shape == (6, 12) and torch.equal(cached, full)


COND_PRIOR = SMALL_PRIOR.model_copy(update={"num_classes": 3, "label_dropout": 0.0})


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
