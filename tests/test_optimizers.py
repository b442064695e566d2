"""Muon (vqprior.optimizers): orthogonalised updates at AdamW's scale on the prior's hidden matrices, AdamW on the rest."""
import pytest
import torch

from small_params import SMALL_PRIOR
from vqprior.config import TrainParams
from vqprior.models.prior import Prior
from vqprior.optimizers import Muon, Optimizers, build_optimizer, orthogonalise

P = TrainParams(epochs=1, batch_size=8, lr=0.01, weight_decay=0.0, warmup_steps=0, grad_clip=0.0, patience=1)


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (48, 48)])
def test_orthogonalise_evens_out_singular_values_and_keeps_the_directions(shape):
    g = torch.Generator().manual_seed(0)
    # an ill-conditioned matrix: singular values from 1 down to 1e-3
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g))
    k = min(shape)
    m = u[:, :k] @ torch.diag(torch.logspace(0, -3, k)) @ v[:, :k].T
    o = orthogonalise(m)
    assert o.shape == m.shape and o.dtype == torch.float32
    s = torch.linalg.svdvals(o)
    assert s.max() < 1.25 and s.min() > 0.1  # was 1000x apart; the smallest ones still grow fastest
    assert (s > 0.6).float().mean() > 0.8
    polar = u[:, :k] @ v[:, :k].T  # the exact orthogonalisation: same singular vectors, all singular values 1
    cosine = (o * polar).sum() / (o.norm() * polar.norm())
    assert cosine > 0.95


def test_muon_step_moves_at_adamw_rms_and_decays_the_weights():
    w = torch.nn.Parameter(torch.randn(32, 128, generator=torch.Generator().manual_seed(1)))
    before = w.detach().clone()
    opt = Muon([w], lr=0.01, weight_decay=0.0)
    w.grad = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    opt.step()
    rms = (w.detach() - before).pow(2).mean().sqrt().item()
    assert 0.2 * 0.01 * 0.7 < rms < 0.2 * 0.01 * 1.25  # AdamW's update RMS is ~0.2 lr; Muon is scaled to it

    decaying = Muon([w], lr=0.1, weight_decay=0.5)
    start = w.detach().clone()
    w.grad = torch.zeros_like(w)  # no gradient: no update, only the decoupled decay
    decaying.step()
    assert torch.allclose(w.detach(), start * (1 - 0.1 * 0.5))


def test_muon_refuses_tensors_that_are_not_matrices():
    with pytest.raises(ValueError, match="2-D weight matrices only"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4, 3, 3))], lr=0.01, weight_decay=0.0)


def test_prior_muon_orthogonalises_the_blocks_matrices_and_adamw_trains_the_rest():
    prior = Prior(SMALL_PRIOR, vocab=16, length=49)
    opt = build_optimizer(prior, P, "muon")
    assert isinstance(opt, Optimizers)
    adamw, muon = opt.optimizers
    in_muon = {id(w) for g in muon.param_groups for w in g["params"]}
    in_adamw = {id(w) for g in adamw.param_groups for w in g["params"]}
    names = {id(w): n for n, w in prior.named_parameters()}
    assert sorted(names[i] for i in in_muon) == sorted(
        f"blocks.{b}.{m}.weight" for b in range(SMALL_PRIOR.n_layers) for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2"))
    assert not in_muon & in_adamw and in_muon | in_adamw == set(names)  # every weight trained, by one optimiser
    assert {names[i] for i in in_adamw} >= {"tok.weight", "pos.weight", "head.weight", "ln.weight"}
    # the training loop sets one lr for all groups and saves one state
    assert len(opt.param_groups) == len(adamw.param_groups) + len(muon.param_groups)


def test_muon_needs_a_model_that_names_its_hidden_matrices():
    with pytest.raises(ValueError, match="optimizer muon needs a model naming its hidden matrices; Linear"):
        build_optimizer(torch.nn.Linear(4, 4), P, "muon")


def test_muon_trains_the_prior_to_a_lower_nll_than_adamw_in_the_same_steps():
    """The toy task of test_distributed (every odd code repeats its left neighbour), 20 steps of each optimiser."""
    codes = torch.randint(0, 16, (256, 49), generator=torch.Generator().manual_seed(0))
    codes[:, 1::2] = codes[:, ::2][:, :24]
    nll = {}
    for kind in ("adamw", "muon"):
        torch.manual_seed(0)
        prior = Prior(SMALL_PRIOR, vocab=16, length=49)
        opt = build_optimizer(prior, P, kind)
        for step in range(20):
            loss, _ = prior.loss(codes[(step * 32) % 256:][:32])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            nll[kind] = prior.loss(codes)[0].item()
    # half the tokens are copies: a prior that learnt the copy is near ln(16) / 2 = 1.39 nats, one that did not 2.77
    assert nll["muon"] < 1.7
    assert nll["muon"] < nll["adamw"] - 0.05
