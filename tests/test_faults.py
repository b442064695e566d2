"""Fault injection: bad params, damaged and hostile files, odd image folders, a broken tracking store and a full disk.
Each case runs a real stage (in this process where the exit is all that matters, as its own process where the exit
code, stderr and timing are the point) and checks the one line it ends with and that no file of the project changed.

One tiny pipeline (prepare -> train_vqvae -> extract_codes -> train_prior -> sample, 300 images, 1 epoch each) is built
once; each case damages a copy of it."""
import hashlib
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT, require_fashion_mnist, run, stage_report, subprocess_env
from vqprior.codes import CodeWriter, read_meta

SMOKE = yaml.safe_load((ROOT / "profiles/smoke.yaml").read_text())
CODE = {"PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}  # the stages a subprocess runs: this checkout's


def tiny_params() -> dict:
    p = json.loads(json.dumps(SMOKE))
    p["prepare"].update(max_train=300, max_test=60)
    p["train_vqvae"]["model"].update(channels=16, res_blocks=0, codebook_size=16, code_dim=8, kmeans_iters=2)
    p["train_vqvae"]["train"].update(epochs=1, warmup_steps=2)
    p["train_prior"]["model"].update(d_model=32, n_layers=1, n_heads=2)
    p["train_prior"]["train"].update(epochs=1, warmup_steps=2)
    p["sample"].update(num_samples=20, batch_size=20, seeds=1)
    p["sweep"]["top_k"] = [0, 8]
    p["evaluate"]["num_reference"] = 50
    return p


def run_main(stage: str, cwd: Path, monkeypatch) -> str | int | None:
    """A stage's main() in `cwd`, as `python -m stages.<stage>` runs it; the SystemExit's code (the line), else None."""
    monkeypatch.chdir(cwd)
    try:
        importlib.import_module(f"stages.{stage}").main()
    except SystemExit as exc:
        return exc.code
    return None


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "link"
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """All in-process stage runs of this module log to one MLflow store (created once)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="module")
def built(tmp_path_factory, store):
    require_fashion_mnist()
    base = tmp_path_factory.mktemp("built")
    (base / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    shutil.copy(ROOT / "dvc.yaml", base / "dvc.yaml")
    with pytest.MonkeyPatch.context() as mp:
        for stage in ("prepare", "train_vqvae", "extract_codes", "train_prior", "sample"):
            assert run_main(stage, base, mp) is None, stage
    return base


@pytest.fixture
def project(built, tmp_path):
    copy = tmp_path / "project"
    shutil.copytree(built, copy, symlinks=True)
    return copy


# --- bad params: every one stops the stage before any work, with the key's name -------------------------------------

def _set(raw: dict, dotted: str, value) -> dict:
    node = raw
    *path, last = dotted.split(".")
    for key in path:
        node = node[key]
    node[last] = value
    return raw


def _yaml(dotted: str, value) -> str:
    return yaml.safe_dump(_set(tiny_params(), dotted, value))


BAD_PARAMS = [
    ("empty", "", "params.yaml is empty; copy params.yaml or a file from profiles/ to it"),
    ("only comments", "# nothing yet\n", "params.yaml is empty; copy params.yaml or a file from profiles/ to it"),
    ("duplicate section", "seed: 1\nseed: 2\n", "params.yaml: key 'seed' appears twice (line 2); keep one"),
    ("duplicate nested key", "sample:\n  top_k: 0\n  temperature: 1.0\n  top_k: 5\n",
     "params.yaml: key 'top_k' appears twice (line 4); keep one"),
    ("yaml syntax", "seed: [1, 2\n", "params.yaml is not valid YAML (ParserError); fix the syntax"),
    ("a list", "- seed\n- data\n", "params.yaml must hold a mapping of sections, got list"),
    ("a scalar", "42\n", "params.yaml must hold a mapping of sections, got int"),
    ("not utf-8", b"seed: \xff\xfe\n", "params.yaml is not UTF-8 text; save it as UTF-8"),
    ("unknown section", _yaml("trainer", {"lr": 1}), "params.yaml: unknown key 'trainer'; fix it and run again"),
    ("unknown key", _yaml("train_prior.train.learning_rate", 0.1),
     "params.yaml: unknown key 'train_prior.train.learning_rate'; fix it and run again"),
    ("wrong type", _yaml("train_prior.train.epochs", "ten"),
     "params.yaml: 'train_prior.train.epochs': Input should be a valid integer, unable to parse string as an integer "
     "(got 'ten'); fix it and run again"),
    ("negative lr", _yaml("train_vqvae.train.lr", -0.1),
     "params.yaml: 'train_vqvae.train.lr': Input should be greater than 0 (got -0.1); fix it and run again"),
    ("lr above 1", _yaml("train_prior.train.lr", 5),
     "params.yaml: 'train_prior.train.lr': Input should be less than or equal to 1 (got 5); fix it and run again"),
    ("unknown optimizer", _yaml("train_prior.train.optimizer", "sgd"),
     "params.yaml: 'train_prior.train.optimizer': Input should be 'adamw' or 'muon' (got 'sgd'); fix it and run again"),
    ("optimizer of a conv net", _yaml("train_vqvae.train.optimizer", "muon"),
     "params.yaml: unknown key 'train_vqvae.train.optimizer'; fix it and run again"),
    ("zero temperature", _yaml("sample.temperature", 0),
     "params.yaml: 'sample.temperature': Input should be greater than 0 (got 0); fix it and run again"),
    ("top_p above 1", _yaml("sample.top_p", 1.5),
     "params.yaml: 'sample.top_p': Input should be less than or equal to 1 (got 1.5); fix it and run again"),
    ("unknown source", _yaml("data.source", "imagenet"),
     "params.yaml: 'data.source': Input should be 'fashion_mnist', 'mnist', 'cifar10', 'stl10' or 'image_folder' "
     "(got 'imagenet'); fix it and run again"),
    ("folder without root", _yaml("data.source", "image_folder"),
     "params.yaml: 'data': Value error, source image_folder needs data.root (the folder) and data.image_size (e.g. 64); "
     "fix it and run again"),
    ("top_k >= codebook", _yaml("sample.top_k", 16),
     "params.yaml: sample.top_k is 16, but top-k of the train_vqvae.model.codebook_size (16) codes or more keeps them "
     "all: use a value below 16, or 0 (off); fix it and run again"),
    ("sweep top_k >= codebook", _yaml("sweep.top_k", [0, 100]),
     "params.yaml: sweep.top_k is [0, 100], but top-k of the train_vqvae.model.codebook_size (16) codes or more keeps "
     "them all: use a value below 16, or 0 (off); fix it and run again"),
    ("fractions leave no train", yaml.safe_dump(_set(_set(tiny_params(), "prepare.val_fraction", 0.6),
                                                     "prepare.test_fraction", 0.5)),
     "params.yaml: prepare.val_fraction (0.6) + prepare.test_fraction (0.5) leave no train images: keep their sum below "
     "1; fix it and run again"),
    ("reference above max_test", _yaml("evaluate.num_reference", 500),
     "params.yaml: evaluate.num_reference (500) is more than the prepare.max_test (60) test images kept: lower it or "
     "raise max_test; fix it and run again"),
    ("heads do not divide width", _yaml("train_prior.model.n_heads", 3),
     "params.yaml: 'train_prior.model': Value error, d_model (32) must be a multiple of n_heads (3); fix it and run again"),
    ("width not a multiple of 8", _yaml("train_vqvae.model.channels", 20),
     "params.yaml: 'train_vqvae.model': Value error, channels 20 gives layer widths [16, 20]: each must be a multiple of "
     "8 (GroupNorm's 8 groups); try 16, or a multiple of it; fix it and run again"),
    ("codebook too small", _yaml("train_vqvae.model.codebook_size", 4),
     "params.yaml: 'train_vqvae.model.codebook_size': Input should be greater than or equal to 5 (got 4); fix it and "
     "run again"),
    ("samples within k", _yaml("sample.num_samples", 3),
     "params.yaml: sample.num_samples is 3, but precision/recall need more than evaluate.prc_neighborhood (3) images "
     "per set: raise it; fix it and run again"),
    ("guidance grid, unconditional", yaml.safe_dump(_set(_set(tiny_params(), "train_prior.model.num_classes", 0),
                                                         "sweep.guidance", [1.0, 2.0])),
     "params.yaml: sweep.guidance lists [1.0, 2.0], but an unconditional prior (train_prior.model.num_classes 0) "
     "ignores guidance: keep one value; fix it and run again"),
    ("health usage above 1", _yaml("train_vqvae.health.min_codebook_usage", 1.5),
     "params.yaml: 'train_vqvae.health.min_codebook_usage': Input should be less than or equal to 1 (got 1.5); fix it "
     "and run again"),
    ("health stop not a bool", _yaml("train_vqvae.health.stop", "maybe"),
     "params.yaml: 'train_vqvae.health.stop': Input should be a valid boolean, unable to interpret input (got 'maybe'); "
     "fix it and run again"),
    ("repeated sweep value", _yaml("sweep.temperature", [1.0, 1.0]),
     "params.yaml: 'sweep': Value error, temperature lists a value twice: [1.0, 1.0]; fix it and run again"),
    ("batch smaller than procs", yaml.safe_dump(_set(_set(tiny_params(), "compute.procs", 4),
                                                     "train_prior.train.batch_size", 2)),
     "params.yaml: train_prior.train.batch_size (2) is smaller than compute.procs (4): each process needs a share of "
     "every batch; lower procs; fix it and run again"),
    ("procs zero", _yaml("compute.procs", 0),
     "params.yaml: 'compute.procs': Input should be greater than or equal to 1 (got 0); fix it and run again"),
    ("cuda without a GPU", _yaml("compute.device", "cuda"),
     "compute.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'"),
]


@pytest.mark.parametrize("text, line", [c[1:] for c in BAD_PARAMS], ids=[c[0] for c in BAD_PARAMS])
def test_bad_params_give_one_line_and_touch_nothing(text, line, tmp_path, monkeypatch):
    if line.startswith("compute.device") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    (tmp_path / "params.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    before = snapshot(tmp_path)
    assert run_main("train_prior", tmp_path, monkeypatch) == f"error: {line}"
    assert snapshot(tmp_path) == before


def test_missing_params_file_is_named(tmp_path, monkeypatch):
    assert run_main("sample", tmp_path, monkeypatch) == ("error: params.yaml not found; run from the project root or "
                                                        "copy a file from profiles/")
    assert list(tmp_path.iterdir()) == []


# --- damaged, foreign and hostile files: the line names the file and the stage that writes it ------------------------

class _Payload:
    """Unpickling this creates the marker file: what a hostile checkpoint could do with any command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def hostile(path: Path, marker: Path) -> None:
    torch.save({"config": {}, "state_dict": {}, "payload": _Payload(marker)}, path)


def cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def out_of_range_codes(path: Path) -> None:
    meta = read_meta(path)
    n = 8
    with CodeWriter(path, "train", meta) as w:  # code 16 of a 16-code book: one past the end
        w.write(np.full((n, meta["grid_height"], meta["grid_width"]), 16), np.arange(n) % 10, np.arange(n))


DAMAGE = {
    "missing": lambda p, m: p.unlink(),
    "empty": lambda p, m: p.write_bytes(b""),
    "truncated": lambda p, m: cut(p),
    "garbage": lambda p, m: p.write_bytes(b"\x00garbage, not what this file should hold\n"),
    "hostile pickle": hostile,
    "a tensor, not a dict": lambda p, m: torch.save(torch.zeros(3), p),
    "json list": lambda p, m: p.write_text("[1, 2]"),
    "json without keys": lambda p, m: p.write_text("{}"),
    "codes past the codebook": lambda p, m: out_of_range_codes(p),
    "image split as code store": lambda p, m: shutil.copy(p.parents[1] / "prepared/train.parquet", p),
}
ckpt, unreadable = "is not a readable checkpoint", "is not a readable Parquet file"
HOSTILE = ("holds objects other than tensors and plain values (a pickle that could run code when loaded) and was "
           "refused")
DAMAGED_FILES = [
    # (file, damage, the stage that reads it, the line's text after "error: <file> ", or the whole line with "=")
    ("data/prepared/stats.json", "missing", "train_vqvae", "not found; run `dvc repro prepare` first"),
    ("data/prepared/stats.json", "empty", "train_vqvae", "is not valid JSON; re-run `dvc repro prepare`"),
    ("data/prepared/stats.json", "garbage", "train_vqvae", "is not valid JSON; re-run `dvc repro prepare`"),
    ("data/prepared/stats.json", "json list", "train_vqvae", "holds a JSON list, not an object; re-run `dvc repro prepare`"),
    ("data/prepared/stats.json", "json without keys", "train_vqvae",
     "lacks normalisation, sha256 (written by older code?); re-run `dvc repro prepare`"),
    ("data/prepared/train.parquet", "missing", "train_vqvae", "not found; run `dvc repro prepare` first"),
    ("data/prepared/train.parquet", "empty", "train_vqvae", f"{unreadable} (ArrowInvalid); re-run `dvc repro prepare`"),
    ("data/prepared/train.parquet", "truncated", "train_vqvae", f"{unreadable} (ArrowInvalid); re-run `dvc repro prepare`"),
    ("data/prepared/train.parquet", "garbage", "train_vqvae", f"{unreadable} (ArrowInvalid); re-run `dvc repro prepare`"),
    ("data/prepared/test.parquet", "truncated", "extract_codes", f"{unreadable} (ArrowInvalid); re-run `dvc repro prepare`"),
    ("models/vqvae.pt", "missing", "extract_codes", "not found; run `dvc repro train_vqvae` first"),
    ("models/vqvae.pt", "empty", "extract_codes", f"{ckpt} (EOFError); re-run `dvc repro train_vqvae`"),
    ("models/vqvae.pt", "truncated", "extract_codes", f"{ckpt} (OSError); re-run `dvc repro train_vqvae`"),
    ("models/vqvae.pt", "garbage", "extract_codes", f"{ckpt} (UnpicklingError); re-run `dvc repro train_vqvae`"),
    ("models/vqvae.pt", "hostile pickle", "extract_codes", f"{HOSTILE}; re-run `dvc repro train_vqvae`"),
    ("models/vqvae.pt", "hostile pickle", "sample", f"{HOSTILE}; re-run `dvc repro train_vqvae`"),
    ("models/vqvae.pt", "a tensor, not a dict", "extract_codes",
     "holds a Tensor, not a checkpoint's dict; re-run `dvc repro train_vqvae`"),
    ("data/codes/train.parquet", "missing", "train_prior", "not found; run `dvc repro extract_codes` first"),
    ("data/codes/train.parquet", "empty", "train_prior", f"{unreadable} (ArrowInvalid); re-run `dvc repro extract_codes`"),
    ("data/codes/train.parquet", "truncated", "train_prior",
     f"{unreadable} (ArrowInvalid); re-run `dvc repro extract_codes`"),
    ("data/codes/train.parquet", "garbage", "train_prior", f"{unreadable} (ArrowInvalid); re-run `dvc repro extract_codes`"),
    ("data/codes/train.parquet", "codes past the codebook", "train_prior",
     "holds code 16, but its codebook has 16 codes (0..15); re-run `dvc repro extract_codes`"),
    ("data/codes/train.parquet", "image split as code store", "train_prior",
     "lacks the split, augmentation, codes column(s) (written by older code?); re-run `dvc repro extract_codes`"),
    ("data/codes/val.parquet", "codes past the codebook", "train_prior",
     "holds code 16, but its codebook has 16 codes (0..15); re-run `dvc repro extract_codes`"),
    ("models/prior.pt", "missing", "sample", "not found; run `dvc repro train_prior` first"),
    ("models/prior.pt", "truncated", "sample", f"{ckpt} (OSError); re-run `dvc repro train_prior`"),
    ("models/prior.pt", "garbage", "sample", f"{ckpt} (UnpicklingError); re-run `dvc repro train_prior`"),
    ("models/prior.pt", "hostile pickle", "sample", f"{HOSTILE}; re-run `dvc repro train_prior`"),
    ("checkpoints/train_prior.pt", "hostile pickle", "train_prior",
     "=error: train_prior: checkpoints/train_prior.pt " + HOSTILE + "; delete it to train from the start"),
    ("checkpoints/train_prior.pt", "garbage", "train_prior",
     "=error: train_prior: checkpoints/train_prior.pt is not a readable checkpoint (UnpicklingError); delete it to "
     "train from the start"),
    ("checkpoints/train_vqvae.pt", "hostile pickle", "train_vqvae",
     "=error: train_vqvae: checkpoints/train_vqvae.pt " + HOSTILE + "; delete it to train from the start"),
]


@pytest.mark.parametrize("name, damage, stage, said", DAMAGED_FILES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}".replace("/", "_") for c in DAMAGED_FILES])
def test_damaged_input_gives_one_line_and_touches_nothing_else(project, monkeypatch, name, damage, stage, said):
    path, marker = project / name, project.parent / "payload-ran"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():  # a resume checkpoint: only there after a crash
        path.write_bytes(b"")
    DAMAGE[damage](path, marker)
    before = snapshot(project)
    line = run_main(stage, project, monkeypatch)
    assert line == (said[1:] if said.startswith("=") else f"error: {name} {said}")
    assert "\n" not in line
    assert not marker.exists(), "the hostile pickle ran its code"
    assert snapshot(project) == before  # no output written, none removed, no temporary file left


@pytest.mark.parametrize("stage, threshold, value, first_reason", [
    # a perplexity threshold above the codebook's size stands in for a collapsed codebook
    ("train_vqvae", "min_perplexity", 1000.0, "perplexity "),
    # a gain over the code-frequency baseline no prior reaches stands in for one that learnt no structure
    ("train_prior", "min_gain", 0.99, "validation NLL "),
])
def test_training_collapse_is_reported_and_stops_when_asked(project, monkeypatch, capsys, stage, threshold, value,
                                                            first_reason):
    """Reported by default (the output's one warning line, `collapsed` in the metrics), fatal on request with one line
    and nothing written. (The one-epoch VQ-VAE is also no better than the mean image, which is reported too.)"""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[stage]["health"].update({threshold: value})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_main(stage, project, monkeypatch) is None
    metrics = stage_report(project, stage)  # the headline file and the detail beside it
    assert metrics["collapsed"] is True
    warning = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith(f"{stage}: warning: the model collapsed ({first_reason}")
    assert f"{stage}.health.{threshold} {value}" in warning[0]
    if stage == "train_vqvae":
        assert metrics["mean_image_mse"] > 0
        no_better = metrics["test_mse"] >= metrics["mean_image_mse"]
        assert ("no better than the mean image" in warning[0]) == no_better
    else:
        assert f"validation NLL {metrics['val_nll']:.4f} is not" in warning[0] and metrics["frequency_nll"] > 0
    params[stage]["health"].update(stop=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    before = snapshot(project)
    line = run_main(stage, project, monkeypatch)
    assert line.startswith(f"error: {stage}: the model collapsed ({first_reason}")
    assert f"{stage}.health.{threshold} {value}" in line
    assert line.endswith(f"({stage}.health.stop is on: no model written)") and "\n" not in line
    assert snapshot(project) == before


# --- odd image folders: every entry seen is a manifest row, kept or dropped for a reason -----------------------------

def odd_folder(root: Path, outside: Path) -> dict[str, str | None]:
    """A folder of good images with the things real folders hold beside them; the reason each entry gets."""
    rng = np.random.default_rng(0)
    expected = {}
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
            expected[f"{cls}/{i}.png"] = None
    (root / "cats/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / ".hidden_folder").mkdir()
    (root / ".hidden_folder/x.png").write_bytes((root / "cats/0.png").read_bytes())
    (root / "cats/loop.png").symlink_to("loop.png")  # points at itself
    (root / "cats/ping.png").symlink_to("pong.png")
    (root / "cats/pong.png").symlink_to("ping.png")
    (root / "dogs/gone.png").symlink_to("nowhere.png")
    (root / "dogs/again").symlink_to(root / "cats")  # a folder link: would list the cats twice
    (root / "dogs/folder.png").mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "dogs/folder.png/inside.png")
    outside.mkdir()
    (outside / "secret.png").write_bytes((root / "cats/2.png").read_bytes())
    (root / "dogs/out.png").symlink_to(outside / "secret.png")
    (root / "dogs/empty.png").write_bytes(b"")
    (root / "dogs/notes.png").write_text("not an image")
    expected |= {"cats/.DS_Store": "hidden", ".hidden_folder/": "hidden", "cats/loop.png": "symlink_loop",
                 "cats/ping.png": "symlink_loop", "cats/pong.png": "symlink_loop", "dogs/gone.png": "broken_link",
                 "dogs/again": "link_to_folder", "dogs/folder.png/": "folder_named_like_image",
                 "dogs/folder.png/inside.png": None, "dogs/out.png": "link_outside_root",
                 "dogs/empty.png": "zero_bytes", "dogs/notes.png": "not_an_image"}
    return expected


def test_odd_folder_entries_are_reasons_and_the_manifest_adds_up(tmp_path, monkeypatch, store):
    root = tmp_path / "images"
    expected = odd_folder(root, tmp_path / "outside")
    tree = snapshot(root)
    params = tiny_params()
    params["data"].update(source="image_folder", root=str(root), image_size=16)
    params["prepare"].update(max_train=None, max_test=None, workers=1, val_fraction=0.15, test_fraction=0.2)
    params["evaluate"]["num_reference"] = 4
    params["sample"]["num_samples"] = 4
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    assert run_main("prepare", project, monkeypatch) is None
    manifest = pd.read_parquet(project / "reports/prepare_manifest.parquet")
    assert {p: r if isinstance(r, str) else None for p, r in zip(manifest["path"], manifest["reason"])} == expected
    report = json.loads((project / "reports/prepare.json").read_text())
    assert report["seen"] == len(manifest) == len(expected)
    assert report["kept"] + report["dropped_total"] == report["seen"]
    assert report["kept"] == (manifest["verdict"] == "kept").sum() == sum(report["split_sizes"].values()) == 25
    for reason, by_split in report["dropped"].items():
        assert sum(by_split.values()) == (manifest["reason"] == reason).sum(), reason
    kept = manifest.query("verdict == 'kept'")
    assert set(kept["class"]) == {"cats", "dogs"} and kept["mode"].notna().all() and (kept["size"] > 0).all()
    assert kept["hash"].str.len().eq(64).all()  # the sha256 of each file's bytes
    assert manifest.query("reason == 'symlink_loop'")["path"].tolist() == ["cats/loop.png", "cats/ping.png",
                                                                           "cats/pong.png"]
    assert snapshot(root) == tree  # the source folder is only read


# --- the tracking store: unreachable, damaged or unusable, it fails fast with one line -------------------------------

def _refuse_writes(path: Path) -> str:
    """Make `path` refuse writes, even root's (chattr +i); the reason a write then fails with."""
    if os.geteuid() != 0:
        path.chmod(0o444 if path.is_file() else 0o555)
        return "Permission denied"
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root where chattr +i fails: no way to refuse a write")
    return "Operation not permitted"


def _allow_writes(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    else:
        path.chmod(0o644 if path.is_file() else 0o755)


def _broken_store(kind: str, project: Path) -> str:
    if kind == "unreachable server":
        return "http://127.0.0.1:9"
    if kind == "unknown host":
        return "http://tracking.invalid:5000"
    db = project.parent / "broken.db"
    if kind == "corrupt database":
        db.write_bytes(b"this is not an sqlite database" * 100)
    elif kind == "database is a folder":
        db.mkdir()
    elif kind == "read-only database":
        shutil.copy(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"), db)
        _refuse_writes(db)
    elif kind == "read-only folder":
        db = project.parent / "locked/mlflow.db"
        db.parent.mkdir()
        shutil.copy(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"), db)
        _refuse_writes(db.parent)
    return f"sqlite:///{db}"


TRACKING = {
    "unreachable server": "error: tracking server http://127.0.0.1:9 is unreachable (Connection refused); start it, "
                          "or unset MLFLOW_TRACKING_URI to use the local store",
    "unknown host": "error: tracking server http://tracking.invalid:5000 is unreachable",
    "corrupt database": "error: tracking store sqlite:///{db} cannot be used (file is not a database); check that {db} "
                        "is a writable MLflow database, or move it away to start a new one",
    "read-only database": "error: tracking store sqlite:///{db} cannot be used ({db} is read-only); make it writable, or "
                          "point MLFLOW_TRACKING_URI elsewhere",
    "read-only folder": "error: tracking store sqlite:///{db} cannot be used ({folder} is read-only); make it writable, "
                        "or point MLFLOW_TRACKING_URI elsewhere",
    "database is a folder": "error: tracking store sqlite:///{db} cannot be used (unable to open database file); check "
                            "that {db} is a writable MLflow database, or move it away to start a new one",
}


@pytest.mark.parametrize("kind", list(TRACKING))
def test_broken_tracking_store_fails_fast_with_one_line(project, monkeypatch, kind):
    uri = _broken_store(kind, project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = snapshot(project)
    t0 = time.monotonic()
    line = run_main("sample", project, monkeypatch)
    assert time.monotonic() - t0 < 15
    db = Path(uri.removeprefix("sqlite:///"))
    if kind.startswith("read-only"):
        _allow_writes(db if kind == "read-only database" else db.parent)
    assert line.startswith(TRACKING[kind].format(db=db, folder=db.parent)) and "\n" not in line
    assert snapshot(project) == before


def test_unreachable_server_as_a_process_one_line_in_seconds(project):
    t0 = time.monotonic()
    result = run([sys.executable, "-m", "stages.sample"], project, env=CODE | {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert time.monotonic() - t0 < 30  # MLflow alone retried for about 4 minutes
    assert result.returncode == 1
    assert result.stderr.splitlines() == [TRACKING["unreachable server"]]



def test_optional_tracking_lets_the_stage_finish_untracked(project, monkeypatch, capsys):
    """tracking.required: false: an unreachable server costs one warning, not the stage's outputs."""
    params = tiny_params()
    params["tracking"]["required"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.rmtree(project / "data/samples")
    (project / "reports/samples.png").unlink()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert run_main("sample", project, monkeypatch) is None
    warned = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warned == ["sample: warning: tracking skipped from here on (" + TRACKING["unreachable server"].removeprefix(
        "error: ") + "; tracking.required is false)"]
    assert (project / "reports/samples.png").stat().st_size > 0 and any((project / "data/samples").iterdir())


@pytest.mark.parametrize("required", [True, False])
def test_store_failing_mid_stage_stops_or_warns_once(required, monkeypatch, capsys):
    """A store that goes away after the run started: a TrackingError where tracking is required, else one warning and
    every later call does nothing."""
    import mlflow

    from stages._tracking import StageRun, TrackingError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    mlflow.set_tracking_uri("http://127.0.0.1:9")
    run = StageRun(mlflow, "sample", required)
    if required:
        with pytest.raises(TrackingError, match=r"^tracking store http://127.0.0.1:9 failed \("):
            run.log_metrics({"fid": 1.0})
        return
    run.log_metrics({"fid": 1.0})
    assert not run.tracking
    run.log_epoch(1, {"loss": 1.0})  # untracked now: silent, at once
    warned = capsys.readouterr().out.splitlines()
    assert len(warned) == 1 and warned[0].startswith("sample: warning: tracking skipped from here on (tracking store "
                                                     "http://127.0.0.1:9 failed (")


# --- the machine: a full disk (here a file-size limit, which fails writes the same way) ------------------------------

def test_full_disk_names_the_file_and_keeps_the_old_output(project):
    """`prepare` writes a 2 MB train split where the process may write files only 256 kB larger than its MLflow
    store (~1 MB)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare"].update(max_train=3000)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    db = project.parent / "store.db"
    assert run([sys.executable, "-c", "import mlflow; mlflow.set_tracking_uri('sqlite:///' + __import__('sys').argv[1]);"
                "mlflow.search_experiments()", str(db)], project, env=CODE).returncode == 0  # the store exists before the limit
    limit = db.stat().st_size + (256 << 10)
    before = snapshot(project)
    result = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=project, capture_output=True, text=True,
                            env=subprocess_env(project, CODE | {"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}), timeout=300,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: cannot write data/prepared/train.parquet (File too large); free space or fix the folder's permissions and "
        "run again (the earlier output is unchanged)")
    assert snapshot(project) == before


def test_permission_denied_names_the_file(project, monkeypatch):
    """A folder the stage may not write stops it with one line (root writes anywhere: for root it is immutable)."""
    samples = project / "data/samples"
    reason = _refuse_writes(samples)
    try:
        before = snapshot(project)
        assert run_main("sample", project, monkeypatch) == (
            f"error: cannot write data/samples/images.npy ({reason}); free space or fix the folder's permissions and "
            "run again (the earlier output is unchanged)")
        assert snapshot(project) == before
    finally:
        _allow_writes(samples)


# --- SIGKILL in the middle of a stage: the old outputs stay, a re-run by hand ends as an uninterrupted run -----------

def _stage(stage: str, project: Path, store: str) -> list:
    """The command of `stage` (a sweep point's: `stage@T-k-p-g`, with its arguments as dvc.yaml writes them)."""
    name, _, point = stage.partition("@")
    args = []
    if point:
        t, k, p, g = point.split("-")
        args = ["--temperature", t, "--top-k", k, "--top-p", p, "--guidance", g, "--out", f"data/sweep/t{t}-k{k}-p{p}-g{g}"]
    return [sys.executable, "-m", f"stages.{name}", *args], dict(cwd=project, env=subprocess_env(
        project, CODE | {"MLFLOW_TRACKING_URI": store}), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(stage: str, project: Path, store: str, ready, timeout: float = 120) -> int:
    """Start `stage`, SIGKILL it (no clean-up code runs) as soon as `ready()` is true; its pid."""
    cmd, kwargs = _stage(stage, project, store)
    proc = subprocess.Popen(cmd, **kwargs)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"{stage} ended before the kill: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    return proc.pid


def _runs_of(store: str, pid: int) -> list[str]:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(store)
    return [r.info.status for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id], f"tags.`vqprior.pid` = '{pid}'")]


def _temporaries(project: Path) -> list[str]:
    return sorted(str(p.relative_to(project)) for p in project.rglob(".*.tmp"))


@pytest.mark.parametrize("stage, outputs, ready, params", [
    # killed while the code files are being written: the old ones stay, the half-written one is a temporary
    ("extract_codes", ["data/codes/train.parquet", "data/codes/val.parquet", "data/codes/test.parquet"],
     lambda p: bool(list((p / "data/codes").glob(".*.tmp"))), {"extract_codes": {"batch_size": 4}}),
    # killed after the first epoch's checkpoint: the re-run resumes from it
    ("train_prior", ["models/prior.pt"], lambda p: (p / "checkpoints/train_prior.pt").exists(),
     {"train_prior": {"train": {"epochs": 3, "batch_size": 8}}}),
    ("train_vqvae", ["models/vqvae.pt"], lambda p: (p / "checkpoints/train_vqvae.pt").exists(),
     {"train_vqvae": {"train": {"epochs": 3, "batch_size": 16}}}),
    ("train_classifier", ["models/classifier.pt"], lambda p: (p / "checkpoints/train_classifier.pt").exists(),
     {"train_classifier": {"train": {"epochs": 3, "batch_size": 16}}}),
], ids=["extract_codes-mid-write", "train_prior-after-epoch-1", "train_vqvae-after-epoch-1",
        "train_classifier-after-epoch-1"])
def test_sigkill_then_rerun_by_hand_gives_the_uninterrupted_outputs(project, store, stage, outputs, ready, params):
    p = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in params.items():
        for key, value in values.items():
            p[section][key] = p[section][key] | value if isinstance(value, dict) else value
    (project / "params.yaml").write_text(yaml.safe_dump(p))
    cmd, kwargs = _stage(stage, project, store)
    done = subprocess.run(cmd, **kwargs, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    uninterrupted = {name: (project / name).read_bytes() for name in outputs}
    tree = snapshot(project)

    pid = _kill_when(stage, project, store, lambda: ready(project))
    after_kill = snapshot(project)
    if stage == "extract_codes":
        assert _temporaries(project), "the kill did not land mid-write"
    for name in outputs:  # the old output, whole, or (a resumed trainer's) none
        assert after_kill[name] == tree[name]
    assert _runs_of(store, pid) == ["RUNNING"]  # what MLflow shows of a killed process

    again = subprocess.run(cmd, **kwargs, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    for name in outputs:
        assert (project / name).read_bytes() == uninterrupted[name], name
    assert _temporaries(project) == [] and not (project / "checkpoints" / f"{stage}.pt").exists()
    assert snapshot(project).keys() == tree.keys()  # no stray file of the killed run
    assert _runs_of(store, pid) == ["KILLED"]  # marked when the stage started again


# --- SIGKILL part-way through every other writing stage: whatever is on disk is whole, the re-run leaves no stray ----

READERS = {".json": lambda p: json.loads(p.read_text()), ".npy": np.load, ".parquet": pd.read_parquet,
           ".png": lambda p: Image.open(p).load(), ".pt": lambda p: torch.load(p, weights_only=True)}
SWEEP_POINT = f"sweep_point@1.0-{tiny_params()['sweep']['top_k'][0]}-1.0-1.0"  # a point of the tiny grid
BEFORE = {"reconstruction_fid": ["reference"], "evaluate": ["reference", "reconstruction_fid", "train_classifier"],
          SWEEP_POINT: ["reference"]}


def _readable(project: Path) -> list[str]:
    """Every output file of the project, each read whole by its type's reader (a half-written one fails)."""
    read = []
    for path in sorted(project.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and path.suffix in READERS:
            READERS[path.suffix](path)
            read.append(str(path.relative_to(project)))
    return read


@pytest.mark.parametrize("stage", ["prepare", "reference", "reconstruction_fid", "sample", "analyse_prior", "evaluate",
                                   SWEEP_POINT])
def test_sigkill_part_way_leaves_whole_files_and_the_rerun_no_stray(project, store, stage):
    """The stage is killed at about 60 % of its uninterrupted wall time: every file left is whole (old or new), a
    re-run by hand succeeds, leaves no temporary and exactly the files of the uninterrupted run, and the killed MLflow
    run is not left RUNNING."""
    for before in BEFORE.get(stage, []):
        cmd, kwargs = _stage(before, project, store)
        assert subprocess.run(cmd, **kwargs, timeout=300).returncode == 0, before
    cmd, kwargs = _stage(stage, project, store)
    t0 = time.monotonic()
    done = subprocess.run(cmd, **kwargs, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seconds = time.monotonic() - t0
    tree = snapshot(project)

    proc = subprocess.Popen(cmd, **kwargs)
    time.sleep(0.6 * seconds)
    proc.kill()
    proc.wait()
    assert len(_readable(project)) >= len([k for k in tree if Path(k).suffix in READERS])  # nothing half-written

    again = subprocess.run(cmd, **kwargs, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _temporaries(project) == [] and snapshot(project).keys() == tree.keys()
    assert "RUNNING" not in _runs_of(store, proc.pid)
