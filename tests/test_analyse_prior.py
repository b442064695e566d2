"""analyse_prior's breakdown of the prior's NLL: flat patches, per position, per class, on hand-made numbers."""
import numpy as np
import pytest
import torch

from stages.analyse_prior import flat_patches, summarise, token_nll
from vqprior.codes import CodeGrid
from small_params import SMALL_PRIOR, cpu
from vqprior.models.prior import Prior
from vqprior.runtime import resolve_runtime


def test_flat_patches_are_those_with_a_pixel_range_of_at_most_four():
    images = np.zeros((2, 4, 4, 1), np.uint8)  # 2x2 grid of 2x2 patches
    images[0, 0, 1] = 200  # image 0: top-left patch has detail
    images[1, 2:, 2:, 0] = [[10, 14], [12, 10]]  # image 1: bottom-right patch spans 4 levels: still flat
    images[1, 0, 2:, 0] = [50, 55]  # image 1: top-right patch spans 5 levels: detail
    assert flat_patches(images, (2, 2)).tolist() == [[False, True, True, True], [True, False, True, True]]


def test_flat_patches_look_at_every_channel():
    images = np.zeros((1, 2, 2, 3), np.uint8)
    images[0, 1, 1, 2] = 9  # only the blue channel of one pixel differs
    assert flat_patches(images, (1, 1)).tolist() == [[False]]


def test_summarise_splits_the_nll_by_position_flat_patches_and_class():
    val = torch.tensor([[1.0, 2.0, 3.0, 6.0], [3.0, 2.0, 1.0, 2.0]])  # 2 grids of 2x2 codes
    train = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 4.0]])
    flat = np.array([[True, False, False, False], [True, True, False, False]])
    m = summarise(val, train, flat, np.array([0, 1]), np.array([0, 1, -1]), (2, 2))
    assert m["val_nll"] == pytest.approx(2.5) and m["train_nll"] == pytest.approx(4 / 3, abs=1e-4)
    assert m["gap"] == pytest.approx(2.5 - 4 / 3, abs=1e-4) and m["val_nats_per_image"] == pytest.approx(10.0)
    assert m["val_nll_by_position"] == [[2.0, 2.0], [2.0, 4.0]]
    assert m["flat_share"] == pytest.approx(3 / 8)
    assert m["val_nll_flat"] == pytest.approx(2.0) and m["val_nll_detail"] == pytest.approx(14 / 5)
    assert m["flat_nll_share"] == pytest.approx(6 / 20)
    # by class: grid means; the unlabelled train grid (-1) counts in train_nll but in no class
    assert m["val_nll_by_class"] == {"0": 3.0, "1": 2.0} and m["train_nll_by_class"] == {"0": 1.0, "1": 2.0}
    assert m["gap_by_class"] == {"0": 2.0, "1": 0.0}
    assert m["num_val"] == 2 and m["num_train"] == 3


def test_no_flat_patch_leaves_its_nll_empty_not_nan():
    val = torch.ones(1, 4)
    m = summarise(val, val, np.zeros((1, 4), bool), np.array([0]), np.array([0]), (2, 2))
    assert m["val_nll_flat"] is None and m["val_nll_detail"] == 1.0 and m["flat_nll_share"] == 0.0


@pytest.mark.parametrize("classes", [0, 3])
def test_token_nll_averages_to_the_priors_own_loss(classes):
    torch.manual_seed(0)
    prior = Prior(SMALL_PRIOR.model_copy(update={"n_layers": 1, "num_classes": classes}), vocab=16,
                  length=6).eval()
    codes = torch.randint(0, 16, (700, 2, 3))  # more than one batch of 512
    labels = torch.randint(0, max(classes, 1), (700,))
    grids = CodeGrid(codes.numpy().astype(np.uint16), labels.numpy(), np.arange(700), np.array(["none"] * 700),
                     {"grid_height": 2, "grid_width": 3, "codebook_size": 16})
    runtime = resolve_runtime(cpu())
    nll = token_nll(prior, grids, runtime)
    with torch.no_grad():
        expected, _ = prior.loss(codes.reshape(700, 6), labels if classes else None)
    assert nll.shape == (700, 6) and float(nll.mean()) == pytest.approx(float(expected), rel=1e-5)
    assert torch.equal(token_nll(prior, grids, runtime, limit=100), nll[:100])
    if classes:  # the class is given: other labels give other numbers
        other = CodeGrid(grids.codes, (grids.labels + 1) % classes, grids.index, grids.augmentation, grids.meta)
        assert not torch.allclose(token_nll(prior, other, runtime), nll)
