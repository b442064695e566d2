"""The pipeline as a Prefect flow: one task per dvc.yaml stage, in the order dvc.yaml implies.

dvc.yaml stays the only definition of the DAG: the order comes from DVC's own graph at run time (a matrix stage
such as the sampling sweep gives one task per point), and each task runs `dvc repro --single-item <stage>`, so DVC's cache decides what is skipped.
Prefect adds retries, logs, a UI and schedules; MLflow gets one "pipeline" run the stage runs nest under.

    python -m flows.pipeline                      # whole DAG, offline (Prefect's temporary local server)
    python -m flows.pipeline --stages prepare     # a subset, still in DAG order
    python -m flows.pipeline --dry-run            # print the derived order
    python -m flows.pipeline --serve --cron "0 3 * * *"   # needs `prefect server start` + PREFECT_API_URL
    python -m flows.pipeline --deploy --pool vqprior      # a deployment for workers: `prefect worker start --pool vqprior`
"""
from __future__ import annotations

import argparse
import contextlib
import os
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

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from stages._dag import select  # noqa: E402
from stages._tracking import PARENT_RUN_ENV, git_commit, ensure_experiment, tracking_uri  # noqa: E402


def stream(cmd: list[str], env: dict, what: str) -> None:
    """Run `cmd` with its output streamed line by line into Prefect's log; a non-zero exit raises with the last lines."""
    logger = get_run_logger()
    tail: deque[str] = deque(maxlen=20)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env=env) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                logger.info(line)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed: `{' '.join(cmd[2:] if cmd[0] == sys.executable else cmd)}` exited with "
                           f"{proc.returncode}; last output:\n" + "\n".join(tail))


def stage_env(parent_run_id: str | None = None) -> dict:
    """The environment of the `dvc` commands a flow runs: the stages' MLflow runs nest under `parent_run_id`."""
    return os.environ | {
        "MLFLOW_TRACKING_URI": tracking_uri(),  # same store whatever the stage's cwd
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),  # stage `python`
        "PYTHONUNBUFFERED": "1",  # lines reach the log as they are printed
    } | ({PARENT_RUN_ENV: parent_run_id} if parent_run_id else {})


# NO_CACHE: DVC's cache alone decides what is skipped
@task(task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(stage: str, parent_run_id: str) -> None:
    """`dvc repro --single-item <stage>`, its output streamed line by line into Prefect's log."""
    stream([sys.executable, "-m", "dvc", "repro", "--single-item", stage], stage_env(parent_run_id), f"stage '{stage}'")


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


# A deployment's flow runs report a heartbeat this often (Prefect's minimum); one silent for SILENT_SECONDS is taken
# for dead (its worker or machine killed) and marked Crashed, which frees the deployment's one slot for the next run.
HEARTBEAT_SECONDS = 30
SILENT_SECONDS = 90


def ensure_process_pool(pool: str) -> None:
    """The process work pool `pool`, created when missing (workers run its flow runs as local processes)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))


def deploy(name: str, pool: str, cron: str, parameters: dict) -> None:
    """Deploy the flow, as it is in this folder, to the process work pool `pool` (created if missing), on `cron`. A
    worker started the standard way (`prefect worker start --pool POOL`) runs it here, and `prefect deployment run
    vqprior-pipeline/NAME` or the UI starts a run. One flow run at a time: DVC allows one `dvc repro` per workspace,
    so a second run waits for the first (its state reads AwaitingConcurrencySlot meanwhile). A run whose worker dies
    is marked Crashed after SILENT_SECONDS without a heartbeat, and the next run takes the workspace: DVC re-runs the
    stage that was cut off (a training stage from its last checkpoint) and skips what had finished."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    ensure_process_pool(pool)
    here = pipeline.from_source(source=str(Path.cwd().resolve()), entrypoint="flows/pipeline.py:pipeline")
    deployment_id = here.deploy(
        name=name, work_pool_name=pool, cron=cron, parameters=parameters, print_next_steps=False,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}})
    crash_silent_runs(f"vqprior-pipeline/{name}", deployment_id)
    print(f"deployed vqprior-pipeline/{name} to work pool '{pool}' (cron {cron}); start a worker with "
          f"`prefect worker start --pool {pool}`, a run with `prefect deployment run vqprior-pipeline/{name}`")


def crash_silent_runs(deployment: str, deployment_id) -> None:
    """The automation Prefect documents for zombie flow runs, for this deployment's runs: a run that sent a heartbeat
    and then neither another one nor a final state within SILENT_SECONDS becomes Crashed. Made anew on each deploy."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    title = f"{deployment}: crash runs without a heartbeat"
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(title):
            client.delete_automation(old.id)
    Automation(
        name=title,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.id": f"prefect.deployment.{deployment_id}"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive, threshold=1, within=timedelta(seconds=SILENT_SECONDS)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {SILENT_SECONDS} s: its worker or machine stopped")],
    ).create()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--stages", nargs="+", metavar="STAGE", help="run only these stages (in DAG order)")
    ap.add_argument("--retries", type=int, default=1, help="retries per stage (default 1)")
    ap.add_argument("--dry-run", action="store_true", help="print the derived order and exit")
    ap.add_argument("--serve", action="store_true", help="serve the flow on a schedule (needs `prefect server start`)")
    ap.add_argument("--deploy", action="store_true", help="deploy to a process work pool for workers")
    ap.add_argument("--pool", default="vqprior", help="work pool for --deploy (default: %(default)s)")
    ap.add_argument("--cron", default="0 3 * * *", help="cron schedule for --serve/--deploy (default: %(default)s)")
    ap.add_argument("--name", default="vqprior-nightly", help="deployment name for --serve/--deploy")
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
    if args.serve or args.deploy:
        from prefect.settings import get_current_settings

        if not get_current_settings().api.url:  # env var or `prefect config set`; else there is no server to use
            sys.exit(f"error: --{'serve' if args.serve else 'deploy'} needs a Prefect server: run `make services` "
                     "(or `prefect server start`), then export PREFECT_API_URL=http://127.0.0.1:4200/api")
    if args.deploy:
        deploy(args.name, args.pool, args.cron, {"stages": args.stages, "retries": args.retries})
        return
    if args.serve:
        pipeline.serve(name=args.name, cron=args.cron, parameters={"stages": args.stages, "retries": args.retries})
        return
    state = pipeline(stages=args.stages, retries=args.retries, return_state=True)
    if state.is_failed():
        sys.exit(f"error: pipeline failed: {state.message}")


if __name__ == "__main__":
    main()
