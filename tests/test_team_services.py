"""The team services of `make services` (services/services.sh), started for real on 127.0.0.1 with ports and folders of
the test's own: PostgreSQL from Debian, an MLflow server on it serving the artifacts, a Prefect server on it."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import ROOT, copy_repo, require_fashion_mnist, run, subprocess_env
from test_faults import tiny_params

SCRIPT = ROOT / "services/services.sh"
PG_VERSION = "15"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(*cmd: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.getuid() == 0 else ["sudo", "-u", "postgres", *cmd]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    if shutil.which("pg_createcluster") is None:
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)", pytrace=False)
    folder = tmp_path_factory.mktemp("services")
    cluster = f"vqprior_test_{os.getpid()}"
    ports = {name: _free_port() for name in ("PG_PORT", "MLFLOW_PORT", "PREFECT_PORT")}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "VQPRIOR_SERVICES_DIR": str(folder),
           "PG_CLUSTER": cluster, "PG_DATA": f"/var/lib/postgresql/{PG_VERSION}/{cluster}",
           "VQPRIOR_BIN": str(Path(sys.executable).parent)}

    def services_sh(command: str) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, f"services.sh {command}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
        return done

    try:
        services_sh("start")
        yield SimpleNamespace(run=services_sh, mlflow=f"http://127.0.0.1:{ports['MLFLOW_PORT']}",
                              prefect=f"http://127.0.0.1:{ports['PREFECT_PORT']}/api", pg_port=ports["PG_PORT"],
                              artifacts=folder / "mlflow-artifacts")
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        root = [] if os.getuid() == 0 else ["sudo"]
        subprocess.run([*root, "pg_dropcluster", "--stop", PG_VERSION, cluster], capture_output=True, timeout=120)


def test_services_listen_on_loopback_only_and_start_idempotently(services):
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout.split("\n")
    for port in (services.pg_port, *(int(url.split(":")[2].split("/")[0]) for url in (services.mlflow, services.prefect))):
        addresses = {line.split()[3].rsplit(":", 1)[0] for line in listening if line.split()[3:4]
                     and line.split()[3].endswith(f":{port}")}
        assert addresses == {"127.0.0.1"}, (port, addresses)
    t0 = time.monotonic()
    again = services.run("start")  # all running: nothing is started twice
    assert time.monotonic() - t0 < 30 and "creating" not in again.stdout
    assert subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True).stdout.startswith(
        "export MLFLOW_TRACKING_URI=http://127.0.0.1:")


def test_stage_runs_land_in_the_server_and_survive_a_restart(services, tmp_path):
    """The DAG up to `train_prior` (tiny params) with MLFLOW_TRACKING_URI at the server: every stage run, its params,
    metrics and artifacts read back through the server's API; the artifacts sit in the server's destination, nothing
    in the repo; the services stopped and started again keep all of it."""
    from mlflow.tracking import MlflowClient

    require_fashion_mnist()
    repo = copy_repo(tmp_path / "repo")
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    done = run([sys.executable, "-m", "dvc", "repro", "train_prior"], repo, {"MLFLOW_TRACKING_URI": services.mlflow})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    def read_back():
        client = MlflowClient(services.mlflow)
        experiment = client.get_experiment_by_name("vqprior")
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        return client, experiment, runs

    client, experiment, runs = read_back()
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's place, not the client's disk
    assert sorted(runs) == ["extract_codes", "prepare", "train_prior", "train_vqvae"]
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    prior = runs["train_prior"]
    detail = json.loads((repo / "reports/train_prior_detail.json").read_text())
    assert prior.data.metrics["val_nll"] == pytest.approx(detail["val_nll"])
    assert prior.data.params["train_prior.train.epochs"] == "1" and prior.data.tags["dvc.stage"] == "train_prior"
    history = Path(client.download_artifacts(prior.info.run_id, "train_prior.csv", str(tmp_path)))
    assert history.read_bytes() == (repo / "plots/train_prior.csv").read_bytes()
    on_server = [p for p in services.artifacts.rglob("train_prior.csv")]
    assert len(on_server) == 1 and on_server[0].read_bytes() == history.read_bytes()
    assert not (repo / "mlartifacts").exists() and not (repo / "mlflow.db").exists()

    services.run("stop")
    services.run("start")
    client, _, after = read_back()
    assert {name: r.info.run_id for name, r in after.items()} == {name: r.info.run_id for name, r in runs.items()}
    assert after["train_prior"].data.metrics == prior.data.metrics
    again = Path(client.download_artifacts(prior.info.run_id, "train_prior.csv", str(tmp_path / "again")))
    assert again.read_bytes() == history.read_bytes()


RACE = """
import sys, time
from stages import _tracking
start = float(sys.argv[1])
while time.time() < start:
    time.sleep(0.001)
print(_tracking.ensure_experiment("created-at-once"))
"""


def test_two_processes_creating_the_experiment_at_once_both_get_it(services):
    env = subprocess_env(ROOT, {"MLFLOW_TRACKING_URI": services.mlflow})
    start = str(time.time() + 8)  # both processes imported MLflow by then
    procs = [subprocess.Popen([sys.executable, "-c", RACE, start], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in outs]
    ids = {out.strip() for out, _ in outs}
    assert len(ids) == 1 and ids.pop().isdigit()


FLOW = """
from prefect import flow

@flow(name="services-check")
def check():
    return 1

check()
"""


def test_prefect_server_keeps_flow_runs_in_postgresql(services):
    done = subprocess.run([sys.executable, "-c", FLOW], env=subprocess_env(ROOT, {"PREFECT_API_URL": services.prefect}),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    query = "SELECT state_type FROM flow_run JOIN flow ON flow.id = flow_run.flow_id WHERE flow.name = 'services-check'"
    rows = subprocess.run(_as_postgres("psql", "-X", "-t", "-A", "-p", str(services.pg_port), "-d", "prefect", "-c",
                                       query), capture_output=True, text=True, timeout=60)
    assert rows.returncode == 0, rows.stderr
    assert rows.stdout.split() == ["COMPLETED"]


def _flow_run_states(api_url: str, ids: list[str]) -> list[tuple[str, str]]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return [(client.read_flow_run(i).state.type.value, client.read_flow_run(i).state.name) for i in ids]


def test_a_deployment_runs_on_a_process_worker_one_flow_run_at_a_time(services, tmp_path):
    """`--deploy` to a process work pool, a worker started the standard way, two runs started with `prefect deployment
    run`: both complete, never at the same time (the second waits on the deployment's concurrency limit), and their
    stage runs land in the MLflow server."""
    from mlflow.tracking import MlflowClient

    require_fashion_mnist()
    repo = copy_repo(tmp_path / "repo")
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    env = {"PREFECT_API_URL": services.prefect, "MLFLOW_TRACKING_URI": services.mlflow}
    deployed = run([sys.executable, "-m", "flows.pipeline", "--deploy", "--pool", "vqprior-test", "--name", "test",
                    "--stages", "prepare", "train_vqvae"], repo, env)
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-3000:]
    prefect = str(Path(sys.executable).parent / "prefect")
    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "vqprior-test", "--type", "process"], cwd=repo,
                                  env=subprocess_env(repo, env), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        ids = []
        for _ in range(2):
            started = run([prefect, "deployment", "run", "vqprior-pipeline/test"], repo, env)
            assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
            ids.append(re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", started.stdout)[0])
        seen, deadline = set(), time.monotonic() + 600
        while True:
            states = _flow_run_states(services.prefect, ids)
            seen |= {name for _, name in states}
            assert [kind for kind, _ in states].count("RUNNING") <= 1, states  # one dvc repro in the workspace
            if all(kind in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for kind, _ in states):
                break
            assert time.monotonic() < deadline, (states, (tmp_path / "worker.log").read_text()[-3000:])
            time.sleep(1)
        assert [kind for kind, _ in states] == ["COMPLETED", "COMPLETED"], (tmp_path / "worker.log").read_text()[-3000:]
        assert "AwaitingConcurrencySlot" in seen, seen
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
    client = MlflowClient(services.mlflow)
    experiment = client.get_experiment_by_name("vqprior").experiment_id
    children = []
    for flow_run_id in ids:
        (parent,) = client.search_runs([experiment], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
        assert parent.info.run_name == "pipeline" and parent.info.status == "FINISHED"
        nested = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        children.append(sorted(r.info.run_name for r in nested))
    # the first flow run ran both stages; the second found them done and DVC skipped them
    assert sorted(children) == [[], ["prepare", "train_vqvae"]]
