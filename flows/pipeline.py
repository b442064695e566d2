"""The pipeline as a Prefect flow: one task per dvc.yaml stage, in the order dvc.yaml implies.

dvc.yaml stays the only definition of the DAG: the order is derived from its deps/outs at run time,
and each task runs `dvc repro --single-item <stage>`, so DVC's cache decides what is skipped.
Prefect adds retries, logs, a UI and schedules; MLflow gets one "pipeline" run the stage runs nest under.

    python -m flows.pipeline                      # whole DAG, offline (Prefect's temporary local server)
    python -m flows.pipeline --stages prepare     # a subset, still in DAG order
    python -m flows.pipeline --dry-run            # print the derived order
    python -m flows.pipeline --serve --cron "0 3 * * *"   # needs `prefect server start` + PREFECT_API_URL
"""
from __future__ import annotations

import argparse
import os
import posixpath
import subprocess
import sys
from collections import deque
from pathlib import Path

# quiet and offline by default; set before prefect/mlflow are imported so they read them
for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # first start runs DB migrations
}.items():
    os.environ.setdefault(_key, _value)

import yaml  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from stages._tracking import PARENT_RUN_ENV, git_commit, ensure_experiment, tracking_uri  # noqa: E402


def _paths(entries) -> list[str]:
    """dvc.yaml lists paths as plain strings or as one-key dicts ({path: {cache: false}})."""
    return [posixpath.normpath(next(iter(e)) if isinstance(e, dict) else e) for e in entries or []]


def _overlaps(out: str, dep: str) -> bool:
    # DVC links stages when an out is the dep, a folder holding it, or a file inside a dep folder
    return out == dep or dep.startswith(out + "/") or out.startswith(dep + "/")


def stage_order(dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """Topological order of dvc.yaml's stages; among ready stages the file's order decides, so it is stable."""
    spec = yaml.safe_load(Path(dvc_yaml).read_text())["stages"]
    templated = [name for name, s in spec.items() if "foreach" in s or "matrix" in s]
    if templated:  # their deps/outs are only known after DVC expands them
        raise ValueError(f"foreach/matrix stages are not supported by flows.pipeline: {templated}")
    outs = {name: _paths((s.get("outs") or []) + (s.get("metrics") or []) + (s.get("plots") or []))
            for name, s in spec.items()}
    upstream = {name: {other for other, their_outs in outs.items() if other != name
                       for dep in _paths(s.get("deps")) for out in their_outs if _overlaps(out, dep)}
                for name, s in spec.items()}
    order: list[str] = []
    while len(order) < len(spec):
        # the first stage in file order whose upstream stages have all been placed
        ready = [name for name in spec if name not in order and upstream[name] <= set(order)]
        if not ready:
            raise ValueError(f"dvc.yaml has a cycle among stages: {sorted(set(spec) - set(order))}")
        order.append(ready[0])
    return order


def select(stages: list[str] | None = None) -> list[str]:
    """The named stages (all when None) in DAG order; an unknown name is an error."""
    order = stage_order()
    unknown = set(stages or []) - set(order)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; dvc.yaml has {order}")
    return [s for s in order if not stages or s in stages]


# NO_CACHE: DVC's cache alone decides what is skipped
@task(task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(stage: str, parent_run_id: str) -> None:
    """`dvc repro --single-item <stage>`, its output streamed line by line into Prefect's log."""
    logger = get_run_logger()
    env = os.environ | {
        PARENT_RUN_ENV: parent_run_id,  # the stage's MLflow run nests under the pipeline run
        "MLFLOW_TRACKING_URI": tracking_uri(),  # same store whatever the stage's cwd
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),  # stage `python`
        "PYTHONUNBUFFERED": "1",  # lines reach the log as they are printed
    }
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    tail: deque[str] = deque(maxlen=20)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env=env) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                logger.info(line)
    if proc.returncode != 0:
        raise RuntimeError(f"stage '{stage}' failed: `dvc repro --single-item {stage}` exited with {proc.returncode}; "
                           f"last output:\n" + "\n".join(tail))


@flow(name="vqprior-pipeline")
def pipeline(stages: list[str] | None = None, retries: int = 1) -> list[str]:
    """Run dvc.yaml's stages (all, or the named subset) one at a time: DVC holds a workspace lock."""
    import mlflow
    from prefect.runtime import flow_run

    from vqprior.config import load_params

    selected = select(stages)

    # a retry resumes a training stage from its last checkpoint, so one retry is cheap insurance
    task_ = run_stage.with_options(retries=retries, retry_delay_seconds=10)
    experiment_id = ensure_experiment(load_params().tracking.experiment)  # the stages' experiment, so nesting shows
    tags = {"git.commit": git_commit(), "prefect.flow_run_id": str(flow_run.id), "stages": ",".join(selected)}
    # the context manager ends the run FAILED if a stage raises
    with mlflow.start_run(experiment_id=experiment_id, run_name="pipeline", tags=tags) as parent:
        for stage in selected:
            task_(stage, parent.info.run_id)
    return selected


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--stages", nargs="+", metavar="STAGE", help="run only these stages (in DAG order)")
    ap.add_argument("--retries", type=int, default=1, help="retries per stage (default 1)")
    ap.add_argument("--dry-run", action="store_true", help="print the derived order and exit")
    ap.add_argument("--serve", action="store_true", help="serve the flow on a schedule (needs `prefect server start`)")
    ap.add_argument("--cron", default="0 3 * * *", help="cron schedule for --serve (default: %(default)s)")
    ap.add_argument("--name", default="vqprior-nightly", help="deployment name for --serve")
    args = ap.parse_args(argv)

    if not Path("dvc.yaml").exists():
        sys.exit("error: dvc.yaml not found; run from the project root")
    try:
        selected = select(args.stages)  # fail on a typo before any server starts
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    if args.dry_run:
        print("\n".join(selected))
        return
    if args.serve:
        from prefect.settings import get_current_settings

        if not get_current_settings().api.url:  # env var or `prefect config set`; else serve has no server
            sys.exit("error: --serve needs a Prefect server: run `prefect server start`, then "
                     "export PREFECT_API_URL=http://127.0.0.1:4200/api")
        pipeline.serve(name=args.name, cron=args.cron, parameters={"stages": args.stages, "retries": args.retries})
        return
    state = pipeline(stages=args.stages, retries=args.retries, return_state=True)
    if state.is_failed():
        sys.exit(f"error: pipeline failed: {state.message}")


if __name__ == "__main__":
    main()
