"""reference -> reconstruction_fid -> evaluate in process on a small fake repo, on the tiny extractor: the cached
reference features give the same numbers as torch-fidelity's direct call, and every protocol field is written."""
import contextlib
import functools
import json

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, stage_report
from test_metrics import fashion_like
from stages import evaluate, reconstruction_fid, reference
from vqprior import extractors as X, features, metrics as M
from vqprior.config import ClassifierModelParams, PriorModelParams, VQVAEModelParams, load_params
from vqprior.data.images import write_images
from vqprior.models import save_model
from vqprior.models.classifier import CLASSIFIER, Classifier
from vqprior.models.prior import Prior
from vqprior.models.vqvae import VQVAE, load_vqvae
from vqprior.runtime import resolve_runtime

N = 40


class _Run:
    def log_metrics(self, metrics):
        self.metrics = metrics

    def log_artifact(self, path, folder=None):
        pass

    def register_version(self, name, folder, tags, description):
        self.registered = (name, tags)
        return "1"


@pytest.fixture
def repo(tmp_path, monkeypatch):
    params = yaml.safe_load((ROOT / "profiles/smoke.yaml").read_text())
    params["evaluate"].update(num_reference=N, batch_size=20, inception_precision="bf16")  # recorded; TINY ignores it
    params["compute"].update(device="cpu", precision="fp32")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    images = fashion_like(3 * N)
    nhwc = lambda x: x.permute(0, 2, 3, 1).numpy()
    write_images("data/prepared/test.parquet", nhwc(images[:N + 10]), np.zeros(N + 10, np.int64))
    write_images("data/prepared/train.parquet", nhwc(images[N + 10:]), np.zeros(2 * N - 10, np.int64))
    torch.manual_seed(0)
    save_model("models/vqvae.pt", VQVAE(VQVAEModelParams(**params["train_vqvae"]["model"]), in_channels=1),
               in_channels=1)
    save_model("models/prior.pt", Prior(PriorModelParams(**params["train_prior"]["model"]), vocab=64, length=49),
               vocab=64, length=49, grid=[7, 7])
    save_model("models/classifier.pt", Classifier(ClassifierModelParams(channels=8, feature_dim=32), in_channels=1, num_classes=10),
               in_channels=1, num_classes=10, image_shape=[28, 28, 1])  # untrained: a fixed random feature space
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/train_classifier_detail.json").write_text(json.dumps({"test_accuracy": 0.5}))
    samples = (images[:N].float() * 0.7 + 30).round().to(torch.uint8)
    (tmp_path / "data/samples").mkdir(parents=True)
    np.save("data/samples/images.npy", samples.numpy())
    monkeypatch.setattr(reference, "timed_features", functools.partial(features.timed_features, extractor=X.TINY))
    tiny_score = functools.partial(features.score, extractor=X.TINY)
    monkeypatch.setattr(features, "score", tiny_score)  # evaluate scores through features.score_samples
    monkeypatch.setattr(reconstruction_fid, "score", tiny_score)
    for stage in (reference, reconstruction_fid, evaluate):
        monkeypatch.setattr(stage, "tracked_run", lambda name, p: contextlib.nullcontext(_Run()))
    return {"test": images[:N], "train": images[N + 10 : 2 * N + 10], "samples": samples}


def test_reference_reconstruction_and_evaluate_stages(repo, tmp_path):
    reference.main()
    reconstruction_fid.main()
    evaluate.main()
    test_feats = np.load("data/reference/test_features.npy")
    assert test_feats.shape == (N, 64) and np.load("data/reference/train_features.npy").shape == (N, 64)

    ref = stage_report(tmp_path, "reference")
    floor = M.fidelity_metrics(repo["train"], repo["test"], extractor=X.TINY, kid=True)
    assert ref["floor_fid"] == pytest.approx(floor["fid"], rel=1e-6)
    assert ref["floor_precision"] == pytest.approx(floor["precision"]) and ref["floor_kid"] == pytest.approx(floor["kid"], rel=1e-6)
    assert {"floor_recall", "num_reference", "num_train", "seconds", "images_per_second"} <= ref.keys()
    assert ref["num_reference"] == ref["num_train"] == N
    assert ref["floor_recall_by_class"] == {"0": pytest.approx(ref["floor_recall"])}  # every image is class 0 here
    assert ref["floor_precision_by_class"] == {"0": pytest.approx(ref["floor_precision"])}

    rec = stage_report(tmp_path, "reconstruction")
    assert {"rfid", "rprecision", "rrecall", "num_images", "seconds"} <= rec.keys() and rec["num_images"] == N
    assert rec["rfid"] > 0
    # the perfect-prior ceiling: the floor's train images (not the reference ones) reconstructed, vs the test features
    vqvae, _ = load_vqvae("models/vqvae.pt", torch.device("cpu"))
    runtime = resolve_runtime(load_params().compute)
    ceiling = M.fidelity_metrics(reconstruction_fid.reconstruct(vqvae, repo["train"], runtime), repo["test"],
                                 extractor=X.TINY, kid=True)
    paired = M.fidelity_metrics(reconstruction_fid.reconstruct(vqvae, repo["test"], runtime), repo["test"],
                                extractor=X.TINY)
    assert rec["num_train"] == N and rec["rfid"] == pytest.approx(paired["fid"], rel=1e-6)
    for key in ("fid", "precision", "recall", "kid"):
        assert rec[f"prior_ceiling_{key}"] == pytest.approx(ceiling[key], rel=1e-6, abs=1e-12), key
    assert rec["prior_ceiling_fid"] != pytest.approx(rec["rfid"])  # other images than rFID's
    assert rec["prior_ceiling_recall_by_class"] == {"0": pytest.approx(ceiling["recall"], rel=1e-6)}
    assert rec["prior_ceiling_precision_by_class"] == {"0": pytest.approx(ceiling["precision"], rel=1e-6)}

    ev = stage_report(tmp_path, "evaluate")
    # the metrics file holds the headline only: by class, per set and the protocol sit in reports/evaluate_detail.json
    assert json.loads(open("metrics/evaluate.json").read()) == {k: ev[k] for k in evaluate.HEADLINE}
    direct = M.fidelity_metrics(repo["samples"], repo["test"], extractor=X.TINY, kid=True)
    for key in ("fid", "precision", "recall", "f_score", "kid"):
        assert ev[key] == pytest.approx(direct[key], rel=1e-6, abs=1e-12), key
    assert ev["floor_fid"] == ref["floor_fid"] and ev["rfid"] == rec["rfid"]
    for key in ("fid", "precision", "recall", "recall_by_class"):  # both scales copied beside the result
        assert ev[f"floor_{key}"] == ref[f"floor_{key}"] and ev[f"prior_ceiling_{key}"] == rec[f"prior_ceiling_{key}"]
    # by class: one class here; the samples have no labels (no labels.npy: an unconditional prior), so recall only
    assert ev["recall_by_class"] == {"0": pytest.approx(direct["recall"], rel=1e-6)} and "precision_by_class" not in ev
    assert ev["num_samples"] == ev["num_reference"] == N and ev["images_per_second"] > 0 and "seconds" in ev
    assert {"feature_extractor", "feature_layer", "reference_split", "prc_neighborhood", "torch_fidelity_version"} <= ev.keys()
    assert ev["inception_precision"] == ref["inception_precision"] == "bf16"
    # the second feature space: the classifier's, samples vs the same first N test images
    in_classifier_space = M.fidelity_metrics(repo["samples"], repo["test"], extractor=CLASSIFIER)
    for key in ("fid", "precision", "recall"):
        assert ev[f"classifier_{key}"] == pytest.approx(in_classifier_space[key], rel=1e-5, abs=1e-9), key
    assert ev["classifier_fid"] > 0 and ev["classifier_test_accuracy"] == 0.5
    assert ev["sample_sets"] == 1 and ev["fid_mean"] == ev["fid"] and ev["fid_std"] == 0.0  # no extra sets


def test_evaluate_reports_the_spread_over_the_extra_sample_sets(repo, tmp_path):
    reference.main()
    reconstruction_fid.main()
    other = (repo["test"].float() * 0.5 + 60).round().to(torch.uint8)  # a second set, as `sample.seeds: 2` writes it
    np.save("data/samples/images_seed1235.npy", other.numpy())
    evaluate.main()
    ev = stage_report(tmp_path, "evaluate")
    direct = [M.fidelity_metrics(x, repo["test"], extractor=X.TINY, kid=True) for x in (repo["samples"], other)]
    assert ev["sample_sets"] == 2 and ev["fid"] == ev["per_set"]["fid"][0]  # the headline is the first set
    for key in ("fid", "precision", "recall"):
        values = [d[key] for d in direct]
        assert ev["per_set"][key] == pytest.approx(values, rel=1e-6, abs=1e-12), key
        assert ev[f"{key}_mean"] == pytest.approx(np.mean(values), rel=1e-6, abs=1e-12), key
        assert ev[f"{key}_std"] == pytest.approx(np.std(values, ddof=1), rel=1e-5, abs=1e-12), key
    assert ev["fid_std"] > 0 and ev["kid"] == pytest.approx(direct[0]["kid"], rel=1e-6)
    assert ev["kid_std"] == pytest.approx(direct[0]["kid_std"], rel=1e-6)  # torch-fidelity's, over subsets of the set


def test_evaluate_without_reference_names_the_stage(repo):
    with pytest.raises(SystemExit, match="dvc repro reference"):
        evaluate.main()


@pytest.mark.parametrize("break_it, message", [
    (lambda: np.save("data/samples/images_seed1235.npy", np.zeros((N, 1, 32, 32), np.uint8)),
     "error: data/samples/images_seed1235.npy holds images of (1, 32, 32) (C, H, W) but the test split's are (1, 28, 28); "
     "re-run `dvc repro sample`"),
    (lambda: open("reports/train_classifier_detail.json", "w").write("{}"),
     "error: reports/train_classifier_detail.json lacks test_accuracy (written by older code?); re-run `dvc repro train_classifier`"),
])
def test_evaluate_checks_every_input_before_any_inception(repo, monkeypatch, break_it, message):
    reference.main()
    reconstruction_fid.main()
    break_it()
    monkeypatch.setattr(features, "score", lambda *a, **k: pytest.fail("scored before the inputs were checked"))
    with pytest.raises(SystemExit) as info:
        evaluate.main()
    assert str(info.value.code) == message
