"""MLflow for the stages: one run per stage run, nested under a pipeline run when a flow drives them.

Nothing outside stages/ and flows/ imports MLflow. The store defaults to `sqlite:///<repo>/mlflow.db`
with artifacts in `<repo>/mlartifacts`; `MLFLOW_TRACKING_URI` overrides it (e.g. the team's server: `make services`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import warnings
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from vqprior.errors import VqpriorError
from vqprior.io import file_hash

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# a tracking server that stops answering fails a call in seconds, not after MLflow's default 7 retries of 120 s each
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")

PARENT_RUN_ENV = "VQPRIOR_PARENT_RUN_ID"
PRECISION_TAGS = ("precision", "inception_precision")  # string metrics kept as tags: what the stage ran in
REACH_SECONDS = 3  # a tracking server that does not accept a connection in this long counts as down
HOST_TAG, PID_TAG = "vqprior.host", "vqprior.pid"  # who runs a stage run: a later start can tell a killed one


class TrackingError(VqpriorError):
    """The tracking store cannot be reached or used."""


def store_errors(os_errors: bool = True) -> tuple[type[BaseException], ...]:
    """What a broken store raises: MLflow's errors, the database's, the network's (and the disk's, for a call that
    only touches the store)."""
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    return (MlflowException, sqlalchemy.exc.SQLAlchemyError, requests.RequestException) + ((OSError,) if os_errors else ())


def tracking_failure(exc: BaseException, uri: str) -> TrackingError:
    """One line for a store that failed: what the store said (its first line) and what to do."""
    said = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:160]
    if getattr(exc, "error_code", None) in ("UNAUTHENTICATED", "PERMISSION_DENIED"):  # MLflow's login (basic-auth)
        return TrackingError(f"tracking server {uri} refused the login ({exc.error_code}): set MLFLOW_TRACKING_USERNAME "
                             "and MLFLOW_TRACKING_PASSWORD to an account that may edit the experiment")
    if uri.startswith("sqlite:"):
        todo = f"check that {uri.removeprefix('sqlite:///')} is a writable MLflow database, or move it away to start a new one"
    else:
        todo = "check the server, or unset MLFLOW_TRACKING_URI to use the local store"
    return TrackingError(f"tracking store {uri} failed ({exc.__class__.__name__}: {said}); {todo}")


DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}


def check_reachable(uri: str, seconds: float = REACH_SECONDS) -> None:
    """Fail in seconds where MLflow would retry for minutes: a server (http, or a database server) must accept a
    connection within `seconds`; an existing SQLite file must open as a database (MLflow retries a broken one for
    about 100 s)."""
    url = urlparse(uri)
    scheme = url.scheme.split("+")[0]  # postgresql+psycopg2 and kin
    if scheme == "sqlite":
        check_sqlite(uri)
    elif scheme in DEFAULT_PORTS and url.hostname:
        try:
            socket.create_connection((url.hostname, url.port or DEFAULT_PORTS[scheme]), timeout=seconds).close()
        except OSError as exc:
            raise TrackingError(f"tracking server {uri} is unreachable ({exc.strerror or exc.__class__.__name__}); "
                                "start it, or unset MLFLOW_TRACKING_URI to use the local store") from None


def check_sqlite(uri: str) -> None:
    """An SQLite store that exists must be a database this process can open for writing (a missing one is created)."""
    import sqlite3

    path = Path(uri.removeprefix("sqlite:///").removeprefix("sqlite://"))
    if not path.exists() or str(path) in ("", ":memory:"):
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=REACH_SECONDS)) as db:
            db.execute("pragma schema_version").fetchone()
    except sqlite3.Error as exc:
        raise TrackingError(f"tracking store {uri} cannot be used ({exc}); check that {path} is a writable MLflow "
                            "database, or move it away to start a new one") from None
    # SQLite opens a file it may not write read-only without a word, and MLflow fails at its first write; SQLite also
    # writes a journal beside the file
    for needed in (path, path.parent):
        if not os.access(needed, os.W_OK):
            raise TrackingError(f"tracking store {uri} cannot be used ({needed} is read-only); make it writable, or "
                                "point MLFLOW_TRACKING_URI elsewhere")


def repo_root() -> Path:
    """The project's folder. A queued DVC experiment runs in a temporary copy under .dvc/tmp/exps, which is deleted
    afterwards; DVC names the project itself in DVC_ROOT, so the default store outlives the experiment."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def is_local_store(uri: str) -> bool:
    """A store in this machine's files (SQLite or a folder), not a tracking server."""
    return urlparse(uri).scheme in ("", "file", "sqlite")


def ensure_experiment(name: str) -> str:
    """Point MLflow at the project's store and return the experiment id (created on first use). A local store keeps
    the artifacts beside it in `<repo>/mlartifacts`; a tracking server chooses their place itself (with
    `--artifacts-destination`, clients upload through it and never write to their own disk). Two processes creating
    the experiment at once both get it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (repo_root() / "mlartifacts").as_uri() if is_local_store(uri) else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow.get_experiment_by_name(name).experiment_id  # another process created it just now


def flatten(obj, prefix: str = "") -> dict:
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump()
    if not isinstance(obj, dict):
        return {prefix: obj}
    out = {}
    for key, value in obj.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def stage_spec(stage: str) -> dict:
    """`stage`'s entry in the dvc.yaml of the workspace the stage runs in."""
    import yaml

    return yaml.safe_load(Path("dvc.yaml").read_text())["stages"][stage]


def stage_param_keys(stage: str) -> list[str]:
    spec = stage_spec(stage)
    keys = []
    for entry in spec.get("params", []):
        keys += list(entry.values())[0] if isinstance(entry, dict) else [entry]
    return [k.split(".")[0] for k in keys]


def dvc_md5(path: str | Path) -> str:
    """The hash DVC records for `path` in dvc.lock: a file's md5; for a folder, the md5 of its listing (each file's
    md5 and relative path, sorted by path, as JSON) with `.dir` appended."""
    path = Path(path)
    if not path.is_dir():
        return file_hash(path, "md5")
    listing = sorted(({"md5": file_hash(f, "md5"), "relpath": f.relative_to(path).as_posix()}
                      for f in path.rglob("*") if f.is_file()), key=lambda entry: entry["relpath"])
    return hashlib.md5(json.dumps(listing).encode()).hexdigest() + ".dir"


def stage_data(stage: str) -> dict[str, list[str]]:
    """The data and model paths dvc.yaml says `stage` reads ("dep") and writes ("out"), code left out; a path that
    names a matrix item (`${item...}`) is left out too."""
    spec = stage_spec(stage)

    def names(entries) -> list[str]:
        paths = [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]
        return [p for p in paths if "${" not in p and not p.endswith(".py") and not p.startswith("src/")]

    return {"dep": names(spec.get("deps")),
            "out": names(spec.get("outs")) + names(spec.get("metrics")) + names(spec.get("plots"))}


def dvc_hash_tags(stage: str) -> dict[str, str]:
    """Tags `dvc.dep.<path>` and `dvc.out.<path>` with the DVC hash of each data and model path the stage read and
    wrote: the run names the exact files `dvc pull` brings back for a commit's dvc.lock."""
    return {f"dvc.{kind}.{p}": dvc_md5(p) for kind, paths in stage_data(stage).items() for p in paths if Path(p).exists()}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_killed_runs(experiment_id: str, stage: str) -> list[str]:
    """Mark KILLED the runs of `stage` that a process on this machine started and that are RUNNING although the
    process is gone (SIGKILL, power loss): MLflow would show them running forever. Runs from other machines, or whose
    process lives, are left alone."""
    from mlflow.tracking import MlflowClient

    client, host, closed = MlflowClient(), socket.gethostname(), []
    for run in client.search_runs([experiment_id], f"tags.`dvc.stage` = '{stage}' and attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get(HOST_TAG) == host and tags.get(PID_TAG, "").isdigit() and not _alive(int(tags[PID_TAG])):
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    if closed:
        print(f"{stage}: marked {len(closed)} run(s) of a killed earlier {stage} KILLED in MLflow")
    return closed


class StageRun:
    """What a stage may log; thin so the stage code reads as plain calls. A store that fails mid-stage stops the stage
    with one line (TrackingError), like one that fails at the start; where `tracking.required` is false, it is
    reported once and the stage goes on untracked. `StageRun(None, ...)` logs nothing."""

    def __init__(self, mlflow, stage: str, required: bool = True):
        self._mlflow = _Guarded(mlflow, stage, required)

    @property
    def tracking(self) -> bool:
        """False once the stage goes on untracked."""
        return self._mlflow._mlflow is not None

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

    def register_version(self, name: str, folder: str, tags: dict, description: str) -> str | None:
        """A new version of the registered model `name` (created on first use) from this run's artifact `folder`;
        its version number, or None when the stage goes on untracked."""
        def register(mlflow):
            from mlflow.exceptions import MlflowException

            client = mlflow.MlflowClient()
            try:
                client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            run_id = mlflow.active_run().info.run_id
            version = client.create_model_version(name, f"runs:/{run_id}/{folder}", run_id=run_id,
                                                  tags={k: str(v) for k, v in tags.items()}, description=description)
            return str(version.version)  # an int from a SQLite store, a string from a server

        return self._mlflow.call(register)


class _Guarded:
    """MLflow's module, each call turning a store failure into a TrackingError (or, where tracking is optional, into
    one warning, after which every call does nothing)."""

    def __init__(self, mlflow, stage: str, required: bool):
        self._mlflow, self._stage, self._required = mlflow, stage, required

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.call(lambda mlflow: getattr(mlflow, name)(*args, **kwargs))

    def call(self, fn):
        """fn(mlflow), guarded; None once the stage goes on untracked."""
        if self._mlflow is None:
            return None
        try:
            return fn(self._mlflow)
        except store_errors() as exc:
            failure = tracking_failure(exc, tracking_uri())
            if self._required:
                raise failure from None
            untracked(self._stage, failure)
            self._mlflow = None


def untracked(stage: str, failure: TrackingError) -> None:
    print(f"{stage}: warning: tracking skipped from here on ({failure}; tracking.required is false)", flush=True)


@contextmanager
def _store(uri: str, os_errors: bool = True):
    try:
        yield
    except store_errors(os_errors) as exc:
        raise tracking_failure(exc, uri) from None


def _start_run(stage: str, params):
    """Start the stage's MLflow run, tagged and with the params dvc.yaml says the stage reads; closes the stage's runs
    that a killed process left RUNNING."""
    import mlflow

    uri = tracking_uri()
    check_reachable(uri)
    with _store(uri):
        experiment_id = ensure_experiment(params.tracking.experiment)
        close_killed_runs(experiment_id, stage)
        parent = os.environ.get(PARENT_RUN_ENV) or None
        active = mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent)
        try:
            mlflow.set_tags({
                "dvc.stage": stage,
                "git.commit": git_commit(),
                "dvc.exp": os.environ.get("DVC_EXP_NAME", ""),
                HOST_TAG: socket.gethostname(),
                PID_TAG: str(os.getpid()),
            })
            dumped = params.model_dump()
            mlflow.log_params(flatten({key: dumped[key] for key in stage_param_keys(stage)}))
        except BaseException:
            with contextlib.suppress(*store_errors()):
                mlflow.end_run("FAILED")
            raise
    return active


@contextmanager
def tracked_run(stage: str, params):
    """The stage's MLflow run around its work. A store that cannot be used fails the stage in seconds with one line,
    or, with `tracking.required: false`, lets it run untracked after one warning."""
    import mlflow

    from stages._cli import other_rank

    if other_rank():  # rank 0 alone logs the stage
        yield StageRun(None, stage)
        return
    required = params.tracking.required
    try:
        active = _start_run(stage, params)
    except TrackingError as failure:
        if required:
            raise
        untracked(stage, failure)
        yield StageRun(None, stage)
        return
    run = StageRun(mlflow, stage, required)
    # the stage's own work runs inside: its disk errors are its own, so only the store's errors are caught here
    # (ending the run writes to the store too)
    try:
        with _store(tracking_uri(), os_errors=False), active:
            yield run
            run.set_tags(dvc_hash_tags(stage))
    except TrackingError as failure:
        if required:
            raise
        if run.tracking:  # (else already reported: the run's end failed as a call before it did)
            untracked(stage, failure)
