"""Checkpoints: byte-reproducible files, round trips, params carried in the file, a prior and VQ-VAE that do not match."""

import pytest
import torch

from small_params import SMALL_PRIOR, SMALL_VQ
from stages._cli import message as stage_line
from vqprior.errors import InputError
from vqprior.models import save_model
from vqprior.models.prior import Prior, load_prior
from vqprior.models.vqvae import VQVAE, load_vqvae


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


COND_PRIOR = SMALL_PRIOR.model_copy(update={"num_classes": 3, "label_dropout": 0.0})


def test_conditional_prior_checkpoint_needs_no_params(tmp_path):
    torch.manual_seed(0)
    prior = Prior(COND_PRIOR, vocab=16, length=10).eval()
    save_model(tmp_path / "prior.pt", prior, vocab=16, length=10, grid=[2, 5])
    loaded, _ = load_prior(tmp_path / "prior.pt")
    inputs, labels = prior.with_start(torch.randint(0, 16, (3, 10))), torch.tensor([2, 1, 0])
    assert loaded.num_classes == 3 and torch.equal(loaded(inputs, labels=labels)[0], prior(inputs, labels=labels)[0])


def test_prior_and_vqvae_from_different_runs_are_refused(tmp_path):
    from vqprior.io import file_hash
    from vqprior.sampling import load_generator
    vq, prior = tmp_path / "vq.pt", tmp_path / "prior.pt"
    save_model(vq, VQVAE(SMALL_VQ), in_channels=1, image_shape=[28, 28, 1])
    save_model(prior, Prior(SMALL_PRIOR, vocab=16, length=49), vocab=16, length=49, grid=[7, 7], vqvae_sha256=file_hash(vq))
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
