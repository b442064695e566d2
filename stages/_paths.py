"""Every file and folder that more than one stage names, each written once here (`dvc.yaml` lists the same paths as
deps and outs; tests/test_dvc_deps.py holds the two together). Files only one stage writes and nothing else reads
(its figures, its history CSV) are named at the top of that stage."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

RAW = Path("data/raw")  # a data source fetched on request
PREPARED = Path("data/prepared")  # {train,val,test}.parquet and stats.json
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
    """A stage's numbers: the headline DVC shows and compares, and the detail (by class, by position, protocol)."""

    metrics: Path
    detail: Path


def _report(name: str) -> Report:
    return Report(Path(f"metrics/{name}.json"), Path(f"reports/{name}_detail.json"))


STAGES_WITH_REPORTS = ("train_classifier", "train_vqvae", "extract_codes", "train_prior", "analyse_prior", "sample",
                       "reference", "evaluate", "sweep")
REPORTS = {stage: _report(stage) for stage in STAGES_WITH_REPORTS} | {
    "reconstruction_fid": _report("reconstruction"),
    "prepare": Report(Path("metrics/prepare.json"), Path("reports/prepare.json")),  # the cleaning report in full
}
