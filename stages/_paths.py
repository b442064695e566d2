"""Every file and folder that more than one stage names, each written once here (`dvc.yaml` lists the same paths as
deps and outs; tests/test_dvc_deps.py holds the two together). Files only one stage writes and nothing else reads
(its figures, its history CSV) are named at the top of that stage."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

RAW = Path("data/raw")  # a data source fetched on request
PREPARED = Path("data/prepared")  # {train,val,test}.parquet and stats.json
TEST_IMAGES = PREPARED / "test.parquet"  # the reference set: its first `evaluate.num_reference` images
TRAIN_IMAGES = PREPARED / "train.parquet"  # the floor's set: its first `evaluate.num_reference` images
REFERENCE = Path("data/reference")  # the cached Inception features of those two sets
TEST_FEATURES = REFERENCE / "test_features.npy"
TRAIN_FEATURES = REFERENCE / "train_features.npy"
CODES = Path("data/codes")  # the code store: {train,val,test} code grids
SAMPLES = Path("data/samples")  # images.npy (+ images_seed<N>.npy, labels.npy)
SWEEP_POINTS = Path("data/sweep")  # one folder of metrics per sampling point

VQVAE = Path("models/vqvae.pt")
PRIOR = Path("models/prior.pt")
CLASSIFIER = Path("models/classifier.pt")

CHECKPOINTS = Path("checkpoints")  # resume states; a finished stage removes its own


def checkpoint(stage: str) -> Path:
    return CHECKPOINTS / f"{stage}.pt"


class Report(NamedTuple):
    """A stage's numbers: all of them in `detail` (by class, by position, the protocol), and for the stages whose
    numbers a user compares across runs, those few under short shared names in `metrics` (what `dvc metrics show`
    prints; None for the other stages)."""

    detail: Path
    metrics: Path | None = None


def _report(name: str, headline: bool) -> Report:
    return Report(Path(f"reports/{name}_detail.json"), Path(f"metrics/{name}.json") if headline else None)


REPORTS = {
    "prepare": Report(Path("reports/prepare.json")),  # the cleaning report in full
    "reference": _report("reference", headline=True),  # the data floor: real train vs test images
    "train_classifier": _report("train_classifier", headline=False),
    "train_vqvae": _report("train_vqvae", headline=True),
    "reconstruction_fid": _report("reconstruction", headline=True),
    "extract_codes": _report("extract_codes", headline=False),
    "train_prior": _report("train_prior", headline=True),
    "analyse_prior": _report("analyse_prior", headline=False),
    "sample": _report("sample", headline=False),
    "evaluate": _report("evaluate", headline=True),
    "sweep": _report("sweep", headline=True),
}
