"""MLflow for the stages: one run per stage run, nested under a pipeline run when a flow drives them.

Nothing outside stages/ and flows/ imports MLflow. The store defaults to `sqlite:///<repo>/mlflow.db`
with artifacts in `<repo>/mlartifacts`; `MLFLOW_TRACKING_URI` overrides it.
"""
from __future__ import annotations

import os
import subprocess
import warnings
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

PARENT_RUN_ENV = "VQPRIOR_PARENT_RUN_ID"
PRECISION_TAGS = ("precision", "inception_precision")  # string metrics kept as tags: what the stage ran in


def repo_root() -> Path:
    return Path.cwd().resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def ensure_experiment(name: str) -> str:
    """Point MLflow at the project's store and return the experiment id (created on first use)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = (repo_root() / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=artifacts)


def flatten(obj, prefix: str = "") -> dict:
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump()
    if not isinstance(obj, dict):
        return {prefix: obj}
    out = {}
    for key, value in obj.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def stage_param_keys(stage: str) -> list[str]:
    import yaml

    spec = yaml.safe_load((repo_root() / "dvc.yaml").read_text())["stages"][stage]
    keys = []
    for entry in spec.get("params", []):
        keys += list(entry.values())[0] if isinstance(entry, dict) else [entry]
    return [k.split(".")[0] for k in keys]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


class StageRun:
    """What a stage may log; thin so the stage code reads as plain calls."""

    def __init__(self, mlflow):
        self._mlflow = mlflow

    def log_epoch(self, step: int, metrics: dict) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_metrics(self, metrics: dict) -> None:
        """The numbers of `metrics`; one level of nesting is flattened ({"recall_by_class": {"8": 0.29}} ->
        "recall_by_class.8"), anything else that is not a number is left to the metrics files."""
        flat = {}
        for key, value in metrics.items():
            flat |= {f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value}
        self._mlflow.log_metrics({k: float(v) for k, v in flat.items() if isinstance(v, (int, float))})
        if tags := {k: flat[k] for k in PRECISION_TAGS if isinstance(flat.get(k), str)}:
            self._mlflow.set_tags(tags)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if Path(path).exists():
            self._mlflow.log_artifact(str(path), artifact_path=folder)

    def log_dataset(self, path: str | Path, name: str, context: str, digest: str | None = None) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():  # two equivalent local-file source classes match; either is right
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(Path(path).resolve().as_uri())
        self._mlflow.log_input(MetaDataset(source, name=name, digest=digest and digest[:16]), context=context)

    def set_tags(self, tags: dict) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})


@contextmanager
def tracked_run(stage: str, params):
    import mlflow

    experiment_id = ensure_experiment(params.tracking.experiment)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent):
        mlflow.set_tags({
            "dvc.stage": stage,
            "git.commit": git_commit(),
            "dvc.exp": os.environ.get("DVC_EXP_NAME", ""),
        })
        # log exactly the params dvc.yaml says this stage reads
        dumped = params.model_dump()
        mlflow.log_params(flatten({key: dumped[key] for key in stage_param_keys(stage)}))
        yield StageRun(mlflow)
