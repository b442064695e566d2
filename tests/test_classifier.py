"""train_classifier on a small real Fashion-MNIST subset, then its feature layer as a torch-fidelity extractor."""
import contextlib
import json

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, require_fashion_mnist, stage_report
from stages import train_classifier
from vqprior import metrics as M
from vqprior.data.images import write_images
from vqprior.data.sources import DEBIAN_FASHION_MNIST, load_idx_dataset
from vqprior.models.classifier import CLASSIFIER, load_classifier, scale_images

SIZES = {"train": 2000, "val": 500, "test": 1000}


class _Run:
    def log_epoch(self, step, metrics):
        pass

    def log_metrics(self, metrics):
        self.metrics = metrics


def write_repo(root, labels=True):
    """params (smoke profile, a smaller and faster classifier) and prepared splits cut from the real data."""
    params = yaml.safe_load((ROOT / "profiles/smoke.yaml").read_text())
    params["compute"].update(device="cpu", precision="fp32")
    params["train_classifier"] = {"model": {"channels": 16, "feature_dim": 64},
                                  "train": {"epochs": 2, "batch_size": 64, "lr": 3e-3, "weight_decay": 0.0,
                                            "warmup_steps": 5, "grad_clip": 1.0, "patience": 2}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    raw = load_idx_dataset(DEBIAN_FASHION_MNIST)
    train, test = raw["train"], raw["test"]
    cuts = {"train": (train, 0), "val": (train, SIZES["train"]), "test": (test, 0)}
    for name, (split, start) in cuts.items():
        rows = slice(start, start + SIZES[name])
        y = split.labels[rows] if labels else np.full(SIZES[name], -1)
        write_images(root / f"data/prepared/{name}.parquet", split.images[rows], y)
    (root / "data/prepared/stats.json").write_text(json.dumps({"sha256": {"labels": labels}}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The stage run once in process (MLflow stubbed); the test images and their labels."""
    require_fashion_mnist()
    root = tmp_path_factory.mktemp("clf")
    write_repo(root)
    run = _Run()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(train_classifier, "tracked_run", lambda name, p: contextlib.nullcontext(run))
        train_classifier.main()
    test = load_idx_dataset(DEBIAN_FASHION_MNIST)["test"]
    images = torch.from_numpy(test.images[: SIZES["test"]].copy()).permute(0, 3, 1, 2).contiguous()
    return {"root": root, "run": run, "weights": str(root / "models/classifier.pt"), "images": images,
            "labels": torch.from_numpy(test.labels[: SIZES["test"]])}


def features(trained, images):
    return M.extract_features(images, extractor=CLASSIFIER, feature_extractor_weights_path=trained["weights"])


def test_stage_learns_far_above_chance_and_writes_metrics(trained):
    out = stage_report(trained["root"], "train_classifier")
    assert out["test_accuracy"] > 0.65 and out["val_accuracy"] > 0.65  # chance is 0.1
    assert out["epochs"] == 2 and out["feature_dim"] == 64 and out["num_classes"] == 10 and out["params"] > 10_000
    assert trained["run"].metrics == out
    assert not (trained["root"] / "checkpoints/train_classifier.pt").exists()  # resume state removed when done
    # the saved model reproduces the reported test accuracy
    model, _ = load_classifier(trained["weights"])
    with torch.no_grad():
        acc = (model(scale_images(trained["images"])).argmax(1) == trained["labels"]).float().mean().item()
    assert acc == pytest.approx(out["test_accuracy"], abs=1e-6)


def test_unlabelled_data_stops_with_one_line(tmp_path, monkeypatch):
    require_fashion_mnist()
    write_repo(tmp_path, labels=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_classifier, "tracked_run", lambda name, p: contextlib.nullcontext(_Run()))
    with pytest.raises(SystemExit, match=r"^error: 2000 of 2000 images in data/prepared/train.parquet have no label"):
        train_classifier.main()


def test_extractor_gives_the_classifier_features(trained):
    images = trained["images"][:300]
    f = features(trained, images)
    assert f.shape == (300, 64) and f.dtype == torch.float32
    model, _ = load_classifier(trained["weights"])
    with torch.no_grad():
        direct = model.features(scale_images(images))
    torch.testing.assert_close(f, direct, rtol=1e-5, atol=1e-5)
    assert f.std(0).gt(0).sum() > 32  # a trained feature space, not dead units


def test_fid_in_classifier_space(trained, monkeypatch):
    images, labels = trained["images"], trained["labels"]
    a = features(trained, images[:400])
    same = M.metrics_from_features(a, a)
    assert abs(same["fid"]) < 1e-3 and same["precision"] == 1.0 and same["recall"] == 1.0
    # two halves of the same distribution are close; two classes (t-shirts vs trousers) are far apart
    halves = M.metrics_from_features(features(trained, images[:500]), features(trained, images[500:]))
    classes = M.metrics_from_features(features(trained, images[labels == 0]), features(trained, images[labels == 1]))
    assert classes["fid"] > 10 * halves["fid"] > 0
    assert classes["f_score"] < 0.5 < halves["f_score"]  # manifolds barely overlap (k-NN radii make P and R asymmetric)
    # fidelity_metrics finds the default weights (models/classifier.pt) and gives the same numbers
    monkeypatch.chdir(trained["root"])
    direct = M.fidelity_metrics(images[:500], images[500:], extractor=CLASSIFIER)
    assert direct["fid"] == pytest.approx(halves["fid"], rel=1e-4) and direct["feature_layer"] == "features"


def test_rgb_input_is_grayed_and_wrong_size_is_refused(trained):
    gray = trained["images"][:20]
    torch.testing.assert_close(features(trained, gray.expand(-1, 3, -1, -1).contiguous()), features(trained, gray))
    with pytest.raises(ValueError, match="trained on 28x28 images, got 32x32"):
        features(trained, torch.zeros(4, 1, 32, 32, dtype=torch.uint8))
