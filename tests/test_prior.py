"""The Transformer prior: causality, the KV cache, attention dropout, token noise, class conditioning, augmentation tags,
and when a trained one counts as collapsed."""
import math

import pytest
import torch

from small_params import SMALL_PRIOR
from vqprior.config import PriorHealthParams
from vqprior.health import code_frequency_nll, prior_collapse
from vqprior.models import save_model
from vqprior.models.prior import KVCache, Prior, attention, load_prior


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


def test_code_frequency_baseline_is_the_validation_nll_of_smoothed_training_frequencies():
    train, val = torch.tensor([[0, 0], [0, 1]]), torch.tensor([[0, 1]])
    # add-one counts 4 and 2 of 6: p(0) = 2/3, p(1) = 1/3; code 2 never seen gets 1/7 with vocab 3
    assert code_frequency_nll(train, val, 2) == pytest.approx(-(math.log(2 / 3) + math.log(1 / 3)) / 2)
    assert code_frequency_nll(train, torch.tensor([2]), 3) == pytest.approx(-math.log(1 / 7))


@pytest.mark.parametrize("val_nll, train_nll, said", [
    (2.0, [3.0, 2.5], []),                        # 20 % below the baseline, training NLL falling
    (2.4, [3.0, 2.5], ["validation NLL 2.4000"]),  # 4 % below: less than min_gain 0.05
    (float("nan"), [3.0, 2.5], ["validation NLL nan"]),
    (2.0, [3.0, 2.99], ["training NLL stopped falling"]),
    (2.0, [3.0], []),                             # one epoch: nothing to compare
])
def test_a_prior_no_better_than_code_frequencies_or_stalled_counts_as_collapsed(val_nll, train_nll, said):
    health = PriorHealthParams(min_gain=0.05, min_loss_drop=0.01, stop=False)
    reasons = prior_collapse(val_nll, 2.5, train_nll, health)
    assert [r[: len(s)] for r, s in zip(reasons, said)] == said and len(reasons) == len(said)
