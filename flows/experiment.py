"""Experiments on workers, across machines: one Prefect flow run per point of a params grid, each a DVC experiment.

A flow run happens in a fresh clone of the project's git repository that the worker makes (the deployment's source is
the `origin` remote), so runs on one machine or several never share a workspace. In that clone it checks out the
commit the grid was made from, pulls what the DVC remote already holds (stages whose inputs did not change are then
not run again), runs `dvc exp run --name NAME -S key=value ...`, and pushes the experiment with `dvc exp push`: its
git ref to `origin`, its outputs to the DVC remote. Any clone then sees them (`dvc exp pull origin NAME`,
`dvc exp show`), and every stage run is in the tracking server, tagged `dvc.exp` with the experiment's name.

    python -m flows.experiment --deploy --pool vqprior              # once; then on each machine:
    prefect worker start --pool vqprior --limit 1                   # (MLFLOW_TRACKING_URI, PREFECT_API_URL set)
    python -m flows.experiment -S train_prior.train.lr=0.001,0.004 -S sample.temperature=0.9,1.0   # 4 flow runs
    python -m flows.experiment -S train_prior.train.lr=0.001,0.004 --dry-run                       # the grid only

`-S KEY=V1,V2,...` takes the values of one key (the syntax of `dvc exp run -S`); the grid is every combination. For
one machine alone, DVC's own queue does the same without Prefect (`dvc exp run --queue`, `dvc queue start -j N`).
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

from flows.pipeline import crash_silent_runs, ensure_process_pool, stage_env, stream, HEARTBEAT_SECONDS
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from stages._tracking import PARENT_RUN_ENV, ensure_experiment, is_local_store, tracking_uri

FLOW = "vqprior-experiment"
DEFAULT_DEPLOYMENT = f"{FLOW}/grid"


def expand_grid(sets: list[str], prefix: str) -> list[tuple[str, list[str]]]:
    """Each combination of the `KEY=V1,V2` assignments as (experiment name, ["KEY=V", ...]), in the given order. The
    name holds each key's last part and value (`grid-lr0.001-temperature0.9`), as git allows in a ref name."""
    axes = []
    for item in sets:
        key, eq, values = item.partition("=")
        if not eq or not key or not values or "" in values.split(","):
            raise ValueError(f"-S {item!r}: write KEY=VALUE or KEY=V1,V2,... (e.g. train_prior.train.lr=0.001,0.004)")
        axes.append([(key, value) for value in values.split(",")])
    if len({axis[0][0] for axis in axes}) < len(axes):
        raise ValueError("a key is given twice: list all its values in one -S KEY=V1,V2")
    grid = []
    for point in itertools.product(*axes):
        words = [f"{key.rsplit('.', 1)[-1]}{value}" for key, value in point]
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join([prefix, *words])).strip("._-")
        grid.append((name, [f"{key}={value}" for key, value in point]))
    return grid


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise ValueError(f"`git {' '.join(args)}` failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout.strip()


def default_dvc_remote() -> str:
    """The URL of this clone's default DVC remote (config.local included, a folder made absolute), which the workers
    pull from and push to."""
    from dvc.repo import Repo

    with Repo() as repo:
        name = repo.config["core"].get("remote")
        if not name:
            raise ValueError("this clone has no default DVC remote: `dvc remote add -d NAME URL` (a shared folder or "
                             "s3://...) so that the workers can share data and models")
        return repo.config["remote"][name]["url"]


@task(task_run_name="{what}", cache_policy=NO_CACHE)
def step(what: str, cmd: list[str], env: dict) -> None:
    stream(cmd, env, what)


@flow(name=FLOW, flow_run_name="{name}")
def experiment(name: str, set_params: list[str], revision: str = "", dvc_remote: str = "",
               targets: list[str] | None = None) -> str:
    """One DVC experiment in this folder (a worker's fresh clone): check out `revision`, pull from `dvc_remote`,
    `dvc exp run --name NAME -S ...` (all stages, or those `targets` need), then push it to origin and the remote."""
    import mlflow
    from prefect.runtime import flow_run

    from vqprior.config import load_params

    uri = tracking_uri()
    if is_local_store(uri):  # the clone, and a store inside it, is deleted when the flow run ends
        raise ValueError(f"experiments on workers need a tracking server, not {uri}: start the worker with "
                         "MLFLOW_TRACKING_URI set (make services; eval \"$(services/services.sh env)\")")
    dvc = [sys.executable, "-m", "dvc"]
    here = Path.cwd()
    # the clone's own code, whatever version of the package the worker's environment has installed
    env = stage_env() | {"PYTHONPATH": os.pathsep.join([str(here / "src"), str(here)])}
    if revision:
        step("fetch", ["git", "fetch", "--quiet", "origin", revision], env)
        step("checkout", ["git", "checkout", "--quiet", "--detach", revision], env)
    if dvc_remote:
        step("remote", [*dvc, "remote", "add", "--local", "--default", "--force", "shared", dvc_remote], env)
    step("pull", [*dvc, "pull", "--allow-missing"], env)
    experiment_id = ensure_experiment(load_params().tracking.experiment)
    tags = {"dvc.exp": name, "git.commit": revision, "prefect.flow_run_id": str(flow_run.id),
            "params": " ".join(set_params)}
    # the context manager ends the run FAILED if the experiment fails
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"experiment {name}", tags=tags) as parent:
        set_flags = [arg for assignment in set_params for arg in ("-S", assignment)]
        step("dvc exp run", [*dvc, "exp", "run", "--name", name, *set_flags, *(targets or [])],
             env | {PARENT_RUN_ENV: parent.info.run_id})
    step("dvc exp push", [*dvc, "exp", "push", "origin", name], env)
    return name


def deploy(name: str, pool: str) -> None:
    """Deploy the experiment flow to the process work pool `pool`; its source is this clone's `origin` at the
    current branch, which each flow run clones afresh on whichever worker takes it."""
    from prefect.runner.storage import GitRepository

    url = _git("remote", "get-url", "origin")
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    ensure_process_pool(pool)
    source = GitRepository(url=url, branch=None if branch == "HEAD" else branch)
    deployment_id = experiment.from_source(source=source, entrypoint="flows/experiment.py:experiment").deploy(
        name=name, work_pool_name=pool, parameters={"dvc_remote": default_dvc_remote()}, print_next_steps=False,
        job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}})
    crash_silent_runs(f"{FLOW}/{name}", deployment_id)
    print(f"deployed {FLOW}/{name} to work pool '{pool}' from {url}; on each machine: "
          f"`prefect worker start --pool {pool} --limit 1`, then `python -m flows.experiment -S KEY=V1,V2 ...`")


def submit(deployment: str, grid: list[tuple[str, list[str]]], targets: list[str] | None) -> None:
    """One flow run of `deployment` per grid point, at this clone's commit (which must be on a remote branch)."""
    from prefect.deployments import run_deployment

    revision = _git("rev-parse", "HEAD")
    if not _git("branch", "-r", "--contains", revision):
        raise ValueError(f"commit {revision[:12]} is not on any remote branch: `git push` it first (the workers "
                         "clone the repository)")
    if _git("status", "--porcelain", "--untracked-files=no"):
        print("warning: uncommitted changes are not part of the experiments (the workers run the commit)")
    for name, assignments in grid:
        run = run_deployment(deployment, parameters={"name": name, "set_params": assignments, "revision": revision,
                                                     "targets": targets}, timeout=0, flow_run_name=name)
        print(f"{name}: flow run {run.id} ({' '.join(assignments)})")
    print(f"{len(grid)} flow runs of {deployment}; when they end: `dvc exp pull origin NAME`, `dvc exp show`")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.experiment", description=__doc__.split("\n")[0])
    ap.add_argument("-S", "--set-param", dest="sets", action="append", default=[], metavar="KEY=V1,V2",
                    help="a params key and its values (repeat for more keys; the grid is every combination)")
    ap.add_argument("--prefix", default="grid", help="experiment names start with this (default: %(default)s)")
    ap.add_argument("--targets", nargs="+", metavar="STAGE", help="run only what these stages need (default: all)")
    ap.add_argument("--deployment", default=DEFAULT_DEPLOYMENT, help="deployment to run (default: %(default)s)")
    ap.add_argument("--dry-run", action="store_true", help="print the grid and exit")
    ap.add_argument("--deploy", action="store_true", help="deploy the experiment flow to a process work pool")
    ap.add_argument("--pool", default="vqprior", help="work pool for --deploy (default: %(default)s)")
    ap.add_argument("--name", default=DEFAULT_DEPLOYMENT.split("/")[1], help="deployment name for --deploy")
    args = ap.parse_args(argv)

    if not Path("dvc.yaml").exists():
        sys.exit("error: dvc.yaml not found; run from the project root")
    try:
        grid = expand_grid(args.sets, args.prefix)
        if args.dry_run:
            print("\n".join(f"{name}: {' '.join(assignments)}" for name, assignments in grid))
            return
        from prefect.settings import get_current_settings

        if not get_current_settings().api.url:  # workers need a server to take runs from
            sys.exit("error: experiments on workers need a Prefect server: run `make services` (or `prefect server "
                     "start`), then export PREFECT_API_URL=http://127.0.0.1:4200/api")
        if args.deploy:
            deploy(args.name, args.pool)
            return
        if not args.sets:
            sys.exit("error: give the grid with -S KEY=V1,V2 (or --deploy to deploy the flow first)")
        submit(args.deployment, grid, args.targets)
    except ValueError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
