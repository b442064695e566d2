"""The whole DAG on the smoke profile, as a user runs it: dvc repro, outputs, MLflow runs, then a no-op re-run."""
import json
import sys

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import DVC, run, stage_report, stages_run

# profiles/smoke.yaml's sweep grid: temperature [1.0] x top_k [20] x top_p [1.0] x guidance [1.0]; the sample
# settings' own point (top_k 0) is evaluate's, a row of the sweep's table without a stage of its own
POINTS = ["sweep_point@1.0-20-1.0-1.0"]
STAGES = ["prepare", "reference", "train_classifier", "train_vqvae", "reconstruction_fid", "extract_codes", "train_prior", "analyse_prior", "sample",
          "evaluate", *POINTS, "sweep"]


def test_smoke_dag_end_to_end(smoke_repo):
    first = run([*DVC, "repro"], smoke_repo)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout

    # outputs of every stage
    for split in ("train", "val", "test"):
        assert pq.read_metadata(smoke_repo / f"data/prepared/{split}.parquet").num_rows > 0
        codes = pq.read_table(smoke_repo / f"data/codes/{split}.parquet")
        assert codes.schema.field("codes").type.list_size == 49
    stats = json.loads((smoke_repo / "data/prepared/stats.json").read_text())
    assert stats["counts"] == {"train": 2700, "val": 300, "test": 500} and stats["image_shape"] == [28, 28, 1]
    images = np.load(smoke_repo / "data/samples/images.npy")
    assert images.shape == (200, 1, 28, 28) and images.dtype == np.uint8 and images.std() > 10
    for split in ("test", "train"):  # the real sets' Inception features, extracted once by `reference`
        feats = np.load(smoke_repo / f"data/reference/{split}_features.npy")
        assert feats.shape == (200, 2048) and feats.dtype == np.float32
    for png in ("prepare_examples", "vqvae_reconstructions", "samples"):
        assert (smoke_repo / f"reports/{png}.png").stat().st_size > 1000

    metrics = {s: stage_report(smoke_repo, s) for s in ("reference", "train_classifier", "train_vqvae", "reconstruction",
                                                       "extract_codes", "train_prior", "sample", "evaluate")}
    prepared = json.loads((smoke_repo / "reports/prepare.json").read_text())
    assert prepared["split_sizes"] == {"train": 2700, "val": 300, "test": 500} and prepared["dropped_total"] == 0
    assert len(list((smoke_repo / "reports/vqvae_epochs").glob("epoch_*.png"))) == 3
    assert metrics["train_vqvae"]["test_mse"] < 0.05 and metrics["train_vqvae"]["epochs"] == 3
    assert metrics["extract_codes"]["images"] == 3500
    assert 0 < metrics["train_prior"]["val_nll"] < np.log(64)  # better than uniform over 64 codes
    # the health checks leave models that trained normally unflagged
    assert metrics["train_vqvae"]["collapsed"] is False and metrics["train_prior"]["collapsed"] is False
    assert metrics["train_prior"]["val_nll"] < 0.95 * metrics["train_prior"]["frequency_nll"]
    # where the prior's NLL goes: its per-code val NLL averages to train_prior's own (the saved, best weights)
    nll = stage_report(smoke_repo, "analyse_prior")
    assert nll["val_nll"] == pytest.approx(metrics["train_prior"]["val_nll"], abs=2e-3)
    assert np.shape(nll["val_nll_by_position"]) == (7, 7)
    assert np.mean(nll["val_nll_by_position"]) == pytest.approx(nll["val_nll"], abs=1e-3)
    assert 0 < nll["flat_share"] < 1 and nll["num_val"] == nll["num_train"] == 300 and len(nll["gap_by_class"]) == 10
    assert (smoke_repo / "reports/prior_nll_map.png").stat().st_size > 1000
    ev = metrics["evaluate"]
    assert {"fid", "precision", "recall", "num_samples", "num_reference", "feature_extractor"} <= ev.keys()
    assert ev["num_samples"] == 200 and ev["num_reference"] == 200
    assert 0 < ev["fid"] < 400 and 0 <= ev["precision"] <= 1 and 0 <= ev["recall"] <= 1
    assert "inception" in ev["feature_extractor"]
    ref, rec = metrics["reference"], metrics["reconstruction"]
    assert ref["num_reference"] == ref["num_train"] == 200 and rec["num_images"] == 200
    assert 0 < ref["floor_fid"] < rec["rfid"] < 400  # real vs real beats the VQ-VAE's reconstructions
    assert 0 <= ref["floor_precision"] <= 1 and 0 <= rec["rprecision"] <= 1 and 0 <= rec["rrecall"] <= 1
    assert ev["floor_fid"] == ref["floor_fid"] and ev["rfid"] == rec["rfid"]  # copied beside the FID
    # real images beat the VQ-VAE's reconstructions, which beat the (tiny) prior's samples, on every measure
    assert ev["fid"] > rec["rfid"] and ref["floor_precision"] > rec["rprecision"] > ev["precision"]
    assert ref["floor_recall"] > rec["rrecall"] >= ev["recall"]
    # the perfect-prior ceiling: the floor's train images through the VQ-VAE lose to the real ones
    assert rec["num_train"] == 200 and ref["floor_fid"] < rec["prior_ceiling_fid"] == ev["prior_ceiling_fid"]
    assert len(rec["prior_ceiling_recall_by_class"]) == 10 and 0 <= rec["prior_ceiling_recall"] <= 1
    assert {"kid", "seconds", "images_per_second"} <= ev.keys() and ev["images_per_second"] > 0
    # the second feature space: a classifier trained on the labels (1 epoch of 2,700 images here)
    assert metrics["train_classifier"]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert ev["classifier_test_accuracy"] == metrics["train_classifier"]["test_accuracy"]
    assert ev["classifier_fid"] > 0 and 0 <= ev["classifier_precision"] <= 1 and 0 <= ev["classifier_recall"] <= 1
    # `sample.seeds: 2`: a second set drawn with the next seed, scored too; its spread beside the headline
    extra = np.load(smoke_repo / "data/samples/images_seed1235.npy")  # the smoke profile's seed is 1234
    assert extra.shape == images.shape and not np.array_equal(extra, images)
    assert metrics["sample"]["seeds"] == ev["sample_sets"] == 2 and ev["per_set"]["fid"][0] == ev["fid"]
    assert ev["per_set"]["fid"][1] != ev["fid"] and ev["fid_mean"] == pytest.approx(np.mean(ev["per_set"]["fid"]))
    assert ev["recall_std"] == pytest.approx(np.std(ev["per_set"]["recall"], ddof=1))
    # by class (a conditional prior: 20 samples of each of the 10 classes): the split adds up to the overall numbers
    assert set(ev["precision_by_class"]) == set(ev["recall_by_class"]) == {str(c) for c in range(10)}
    assert np.mean(list(ev["precision_by_class"].values())) == pytest.approx(ev["precision"])
    assert ev["floor_recall_by_class"] == ref["floor_recall_by_class"] and len(ref["floor_recall_by_class"]) == 10

    # the sweep: evaluate's point (the `sample` settings) and one scored point per grid point, the best by FID named
    sweep = stage_report(smoke_repo, "sweep")
    points = sweep["points"]
    assert [(q["temperature"], q["top_k"], q["top_p"], q["guidance"]) for q in points] == [(1.0, 0, 1.0, 1.0),
                                                                                          (1.0, 20, 1.0, 1.0)]
    assert all(q["num_samples"] == 200 and 0 < q["fid"] < 400 and 0 <= q["recall"] <= 1 for q in points)
    assert sweep["best"] == min(range(2), key=lambda i: points[i]["fid"])
    assert {k: sweep[f"best_{k}"] for k in ("temperature", "top_k", "fid", "recall")} == {
        k: points[sweep["best"]][k] for k in ("temperature", "top_k", "fid", "recall")}
    assert points[0]["fid"] == ev["fid"] and points[0]["precision"] == ev["precision"]
    assert [q["source"] for q in points] == ["evaluate", "sweep_point"]
    assert points[1]["fid"] != points[0]["fid"]  # top-k 20 of 64 codes changes the samples
    assert sorted(d.name for d in (smoke_repo / "data/sweep").iterdir() if d.is_dir()) == ["t1.0-k20-p1.0-g1.0"]  # no repeat
    assert (smoke_repo / "plots/sweep.csv").read_text().splitlines()[0].startswith("temperature,top_k,top_p,guidance,fid")
    assert (smoke_repo / "reports/sweep.png").stat().st_size > 1000

    # one MLflow run per stage (per sweep point too), with params and metrics
    mlflow.set_tracking_uri(f"sqlite:///{smoke_repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["vqprior"])
    assert sorted(runs["tags.mlflow.runName"]) == sorted(s.split("@")[0] for s in STAGES)
    by_stage = runs.set_index("tags.mlflow.runName")
    assert by_stage.loc["train_vqvae", "params.train_vqvae.model.codebook_size"] == "64"
    assert by_stage.loc["evaluate", "metrics.fid"] == ev["fid"]
    assert by_stage.loc["reference", "metrics.floor_fid"] == ref["floor_fid"]
    assert by_stage.loc["reconstruction_fid", "metrics.rfid"] == rec["rfid"]
    assert (by_stage["status"] == "FINISHED").all()
    # each run names the DVC hashes of the data and models it read and wrote: those dvc.lock records
    lock = yaml.safe_load((smoke_repo / "dvc.lock").read_text())["stages"]
    hashed = {(stage, kind[:-1], e["path"]): e["md5"] for stage in ("prepare", "train_vqvae", "extract_codes",
              "train_prior", "evaluate") for kind in ("deps", "outs") for e in lock[stage][kind]
              if not e["path"].endswith(".py") and not e["path"].startswith("src/")}
    assert len(hashed) == 31 and all(by_stage.loc[stage, f"tags.dvc.{kind}.{path}"] == md5
                                     for (stage, kind, path), md5 in hashed.items())
    # evaluate registered the generator it scored: one version, its models' DVC hashes, the scores
    (version,) = mlflow.MlflowClient().search_model_versions("name = 'vqprior-generator'")
    assert version.run_id == by_stage.loc["evaluate", "run_id"] and float(version.tags["fid"]) == ev["fid"]
    prior_md5 = next(e["md5"] for e in lock["train_prior"]["outs"] if e["path"] == "models/prior.pt")
    assert version.tags["dvc.md5.models/prior.pt"] == prior_md5

    # where the time went: one row per stage from MLflow's run times, the Inception images they extracted
    times = run([sys.executable, "-m", "stages.times"], smoke_repo)
    assert times.returncode == 0, times.stderr[-3000:]
    header, *rows, total = times.stdout.splitlines()
    assert header.split()[:3] == ["stage", "minutes", "status"]
    assert sorted(r.split()[0] for r in rows) == sorted(STAGES) and all("FINISHED" in r for r in rows)
    # reference (200 test + 200 train), reconstruction_fid (200 + 200), evaluate (2 sets of 200), one sweep point
    assert total.split()[0] == "total" and total.split()[-1] == f"{400 + 400 + 400 + 200:,}"
    assert sum(float(r.split()[1]) for r in rows) == pytest.approx(float(total.split()[1]), abs=0.1 * len(rows))

    # nothing changed: the second repro runs no stage and logs no run
    second = run([*DVC, "repro"], smoke_repo)
    assert second.returncode == 0
    assert "Running stage" not in second.stdout
    assert len(mlflow.search_runs(experiment_names=["vqprior"])) == len(STAGES)
    shown = run([*DVC, "metrics", "show", "--json"], smoke_repo)
    assert shown.returncode == 0 and "fid" in shown.stdout

    # DVC caches each sweep point: a grid with one more guidance scale runs only the new points and the table
    params = smoke_repo / "params.yaml"
    params.write_text(params.read_text().replace("guidance: [1.0]", "guidance: [1.0, 3.0]"))
    third = run([*DVC, "repro", "sweep"], smoke_repo)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert sorted(stages_run(third)) == ["sweep", "sweep_point@1.0-20-1.0-3.0"]
    points = stage_report(smoke_repo, "sweep")["points"]
    assert [q["guidance"] for q in points] == [1.0, 1.0, 3.0]
    guided, plain = (np.load(smoke_repo / f"data/sweep/t1.0-k20-p1.0-g{g}/images.npy") for g in ("3.0", "1.0"))
    assert guided.shape == images.shape and not np.array_equal(guided, plain)  # guidance changes the samples

    # an empty grid (the default's): no sweep_point stage, the table holds evaluate's point alone
    params.write_text(params.read_text().replace("temperature: [1.0]", "temperature: []"))
    fourth = run([*DVC, "repro"], smoke_repo)
    assert fourth.returncode == 0, fourth.stdout[-3000:] + fourth.stderr[-3000:]
    assert stages_run(fourth) == ["sweep"]
    assert "sweep grid is empty" in fourth.stdout
    (only,) = stage_report(smoke_repo, "sweep")["points"]
    assert only["source"] == "evaluate" and only["fid"] == ev["fid"]
    # the points that left the grid keep their MLflow runs, but `times` counts the stages of today's DAG only
    times = run([sys.executable, "-m", "stages.times"], smoke_repo)
    assert times.returncode == 0, times.stderr[-3000:]
    _, *rows, total = times.stdout.splitlines()
    assert sorted(r.split()[0] for r in rows) == sorted(s for s in STAGES if s not in POINTS)
    assert total.split()[-1] == f"{400 + 400 + 400:,}"


def test_dvc_metrics_show_is_one_screen_of_headline_numbers(smoke_repo):
    """The files DVC reads as metrics hold a few numbers under names shared across stages: one table that fits a
    screen, each number the same as in the stage's full report."""
    shown = run([*DVC, "metrics", "show"], smoke_repo)
    assert shown.returncode == 0, shown.stderr[-2000:]
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["Path", "ceiling_fid", "classifier_fid", "fid", "fid_std", "mse", "nll", "perplexity",
                                "precision", "recall", "rfid"]
    assert [line.split()[0] for line in lines[1:]] == [f"metrics/{name}.json" for name in (
        "reference", "train_vqvae", "reconstruction", "train_prior", "evaluate", "sweep")]
    assert max(map(len, lines)) <= 160
    floor = json.loads((smoke_repo / "metrics/reference.json").read_text())
    assert floor == {k: stage_report(smoke_repo, "reference")[f"floor_{k}"] for k in ("fid", "precision", "recall")}


def test_dvc_experiment_with_a_set_param(smoke_repo):
    """`dvc exp run -S` re-runs only what reads the param; `dvc exp show` and MLflow both know the experiment."""
    baseline = json.loads((smoke_repo / "metrics/evaluate.json").read_text())["fid"]
    exp = run([*DVC, "exp", "run", "-n", "hot", "-S", "sample.temperature=1.3"], smoke_repo)
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    # the sweep points take their temperature from the grid, not `sample`; only the table's evaluate row changes
    assert sorted(stages_run(exp)) == ["evaluate", "sample", "sweep"]

    shown = run([*DVC, "exp", "show", "--json"], smoke_repo)
    assert shown.returncode == 0, shown.stderr[-3000:]
    exps = [e["revs"][0] for row in json.loads(shown.stdout) for e in row.get("experiments") or []]
    hot = next(e for e in exps if e["name"] == "hot")["data"]
    assert hot["params"]["params.yaml"]["data"]["sample"]["temperature"] == 1.3
    fid = hot["metrics"]["metrics/evaluate.json"]["data"]["fid"]
    assert fid == json.loads((smoke_repo / "metrics/evaluate.json").read_text())["fid"] != baseline

    mlflow.set_tracking_uri(f"sqlite:///{smoke_repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["vqprior"], filter_string="tags.`dvc.exp` = 'hot'")
    assert sorted(runs["tags.mlflow.runName"]) == ["evaluate", "sample", "sweep"]
    assert runs.set_index("tags.mlflow.runName").loc["sample", "params.sample.temperature"] == "1.3"
