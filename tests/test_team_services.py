"""The team services of `make services` (services/services.sh), started for real on 127.0.0.1 with ports and folders of
the test's own: PostgreSQL from Debian, an MLflow server on it serving the artifacts, a Prefect server on it."""
import contextlib
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

from conftest import (DVC, GIT_ENV, ROOT, copy_repo, require_fashion_mnist, run, run_dvc_queue, run_ok,
                      subprocess_env)
from test_faults import tiny_params

SCRIPT = ROOT / "services/services.sh"
PG_VERSION = "15"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(*cmd: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.getuid() == 0 else ["sudo", "-u", "postgres", *cmd]


def _stop_group(process: subprocess.Popen, grace: float = 60) -> None:
    """SIGTERM to the process's group; SIGKILL when it has not ended after `grace` seconds (a loaded machine)."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


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
        yield SimpleNamespace(run=services_sh, env=env, mlflow=f"http://127.0.0.1:{ports['MLFLOW_PORT']}",
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
    done = run([*DVC, "repro", "train_prior"], repo, {"MLFLOW_TRACKING_URI": services.mlflow})
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


FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def _deployed(services, tmp_path, params: dict, pool: str) -> tuple[Path, dict]:
    """A copy of the project with `params`, deployed (prepare and train_vqvae) to the process work pool `pool`."""
    require_fashion_mnist()
    repo = copy_repo(tmp_path / "repo")
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = {"PREFECT_API_URL": services.prefect, "MLFLOW_TRACKING_URI": services.mlflow}
    deployed = run([sys.executable, "-m", "flows.pipeline", "--deploy", "--pool", pool, "--name", "test",
                    "--stages", "prepare", "train_vqvae"], repo, env)
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-3000:]
    return repo, env


def _worker(repo: Path, env: dict, pool: str, log: Path, *options: str) -> subprocess.Popen:
    """`prefect worker start`, as a user starts it, in its own process group."""
    with open(log, "a") as out:
        return subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool,
                                 "--type", "process", *options], cwd=repo, env=subprocess_env(repo, env), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _start_run(repo: Path, env: dict) -> str:
    started = run([str(Path(sys.executable).parent / "prefect"), "deployment", "run", "vqprior-pipeline/test"], repo, env)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    return re.search(UUID, started.stdout)[0]


def _stage_runs(services, flow_run_id: str) -> list[str]:
    """The stage runs nested under the flow run's MLflow `pipeline` run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(services.mlflow)
    experiment = client.get_experiment_by_name("vqprior").experiment_id
    (parent,) = client.search_runs([experiment], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    nested = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return sorted(r.info.run_name for r in nested)


def test_a_deployment_runs_on_a_process_worker_one_flow_run_at_a_time(services, tmp_path):
    """`--deploy` to a process work pool, a worker started the standard way, two runs started with `prefect deployment
    run`: both complete, never at the same time (the second waits on the deployment's concurrency limit), and their
    stage runs land in the MLflow server."""
    repo, env = _deployed(services, tmp_path, tiny_params(), "vqprior-test")
    worker = _worker(repo, env, "vqprior-test", tmp_path / "worker.log")
    try:
        ids = [_start_run(repo, env) for _ in range(2)]
        seen, deadline = set(), time.monotonic() + 600
        while True:
            states = _flow_run_states(services.prefect, ids)
            seen |= {name for _, name in states}
            assert [kind for kind, _ in states].count("RUNNING") <= 1, states  # one dvc repro in the workspace
            if all(kind in FINAL for kind, _ in states):
                break
            assert time.monotonic() < deadline, (states, (tmp_path / "worker.log").read_text()[-3000:])
            time.sleep(1)
        assert [kind for kind, _ in states] == ["COMPLETED", "COMPLETED"], (tmp_path / "worker.log").read_text()[-3000:]
        assert "AwaitingConcurrencySlot" in seen, seen
    finally:
        _stop_group(worker)
    # the first flow run ran both stages; the second found them done and DVC skipped them
    assert sorted(_stage_runs(services, i) for i in ids) == [[], ["prepare", "train_vqvae"]]


def test_a_worker_killed_mid_stage_then_a_new_worker_completes_the_next_run(services, tmp_path):
    """SIGKILL to a worker and every process under it (its flow run, `dvc repro`, the stage) while `train_vqvae`
    runs, as when its machine dies: the silent flow run is marked Crashed (the deployment's heartbeat automation),
    which frees the workspace; a run started meanwhile, picked up by a new worker, completes, DVC running only the
    stage that was cut off; `dvc status` is clean and the killed stage's MLflow run is closed KILLED."""
    import psutil
    from mlflow.tracking import MlflowClient

    params = tiny_params()
    params["train_vqvae"]["train"].update(epochs=40, patience=40)  # long enough to be killed in the middle
    repo, env = _deployed(services, tmp_path, params, "vqprior-kill")
    log = tmp_path / "worker.log"
    worker = _worker(repo, env, "vqprior-kill", log)
    client = MlflowClient(services.mlflow)
    since = f"attributes.start_time > {int(time.time() * 1000)}"
    try:
        first = _start_run(repo, env)
        deadline = time.monotonic() + 300
        while not (running := [r for e in client.search_experiments(filter_string="name = 'vqprior'") for r in
                               client.search_runs([e.experiment_id], "attributes.run_name = 'train_vqvae' and "
                                                  f"attributes.status = 'RUNNING' and {since}")]):
            assert time.monotonic() < deadline and _flow_run_states(services.prefect, [first])[0][0] not in FINAL, \
                log.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(3)  # in the middle of its epochs
        everything = [worker.pid] + [p.pid for p in psutil.Process(worker.pid).children(recursive=True)]
        for pid in everything:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        worker.wait(timeout=30)
        assert _flow_run_states(services.prefect, [first]) == [("RUNNING", "Running")]  # what the server last heard
        killed_stage = running[0].info.run_id

        second = _start_run(repo, env)
        worker = _worker(repo, env, "vqprior-kill", log)
        deadline = time.monotonic() + 480
        while (states := _flow_run_states(services.prefect, [first, second]))[1][0] not in FINAL:
            assert time.monotonic() < deadline, (states, log.read_text()[-3000:])
            time.sleep(2)
    finally:
        _stop_group(worker)
    assert [kind for kind, _ in states] == ["CRASHED", "COMPLETED"], (states, log.read_text()[-3000:])
    assert _stage_runs(services, second) == ["train_vqvae"]  # prepare had finished: DVC skipped it
    assert client.get_run(killed_stage).info.status == "KILLED"
    status = run([*DVC, "status", "train_vqvae"], repo)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr[-2000:]


@pytest.fixture(scope="module")
def baseline(services, tmp_path_factory):
    """A team's baseline: a user's clone (tiny params) that ran the DAG to train_prior into the servers, pushed the
    outputs to a DVC remote and its commit to a bare git remote, `origin`."""
    require_fashion_mnist()
    base = tmp_path_factory.mktemp("baseline")
    user, origin, remote = base / "user", base / "origin.git", base / "dvc-remote"
    copy_repo(user)
    (user / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    env = {"PREFECT_API_URL": services.prefect, "MLFLOW_TRACKING_URI": services.mlflow, **GIT_ENV}
    for cmd in ([*DVC, "remote", "modify", "--local", "storage", "url", str(remote)], [*DVC, "repro", "train_prior"],
                [*DVC, "push"], ["git", "add", "-A"], ["git", "commit", "-qm", "baseline"],
                ["git", "init", "-q", "--bare", str(origin)], ["git", "remote", "add", "origin", str(origin)],
                ["git", "push", "-q", "-u", "origin", "HEAD"]):
        run_ok(cmd, user, env)
    return SimpleNamespace(user=user, origin=origin, remote=remote, env=env)


def test_a_grid_of_experiments_runs_one_flow_run_per_point_on_workers_of_two_machines(services, baseline, tmp_path):
    """`python -m flows.experiment --deploy`, two workers started the standard way (`--limit 1`) in folders of their
    own with no copy of the project, as on two machines, and a two-point grid: each worker takes one flow run, which
    clones the git remote, pulls the baseline's outputs from the DVC remote (so only the changed stage runs), runs
    its DVC experiment and pushes it; its stage runs land in the MLflow server under the experiment's name, and the
    user's clone pulls the experiments back, outputs included."""
    from mlflow.tracking import MlflowClient

    user, origin, env = baseline.user, baseline.origin, baseline.env

    def ok(cmd: list[str], cwd: Path = user) -> str:
        return run_ok(cmd, cwd, env).stdout

    assert "deployed vqprior-experiment/grid" in ok([sys.executable, "-m", "flows.experiment", "--deploy",
                                                     "--pool", "vqprior-grid"])

    logs = [tmp_path / f"worker-{machine}.log" for machine in "ab"]
    workers = []
    for log in logs:
        (machine := tmp_path / log.stem).mkdir()
        workers.append(_worker(machine, env | {"PREFECT_WORKER_QUERY_SECONDS": "2"}, "vqprior-grid", log,
                               "--limit", "1"))
    try:
        submitted = ok([sys.executable, "-m", "flows.experiment", "-S", "train_prior.train.lr=0.001,0.004",
                        "--targets", "train_prior"])
        ids = re.findall(UUID, submitted)
        assert len(ids) == 2 and "grid-lr0.001:" in submitted and "grid-lr0.004:" in submitted, submitted
        deadline = time.monotonic() + 600
        while True:
            states = _flow_run_states(services.prefect, ids)
            if all(kind in FINAL for kind, _ in states):
                break
            assert time.monotonic() < deadline, (states, *(log.read_text()[-2000:] for log in logs))
            time.sleep(2)
    finally:
        for worker in workers:
            _stop_group(worker)
    assert [kind for kind, _ in states] == ["COMPLETED", "COMPLETED"], [log.read_text()[-3000:] for log in logs]
    # one flow run on each worker. Both may claim the same run in one poll: the server lets one win and the other
    # logs "Aborted submission", so a worker's runs are those it submitted and was not refused
    taken = [sorted(i for i in ids if f"submitting flow run '{i}'" in text and
                    f"Aborted submission of flow run '{i}'" not in text) for text in (log.read_text() for log in logs)]
    assert sorted(map(len, taken)) == [1, 1] and set(sum(taken, [])) == set(ids), taken

    client = MlflowClient(services.mlflow)
    experiment = client.get_experiment_by_name("vqprior").experiment_id
    for name, lr in (("grid-lr0.001", "0.001"), ("grid-lr0.004", "0.004")):
        runs = client.search_runs([experiment], f"tags.`dvc.exp` = '{name}'")
        by_name = {r.info.run_name: r for r in runs}
        # the outputs of prepare, train_vqvae and extract_codes came from the DVC remote: train_prior alone ran
        assert sorted(by_name) == [f"experiment {name}", "train_prior"], sorted(by_name)
        assert by_name["train_prior"].data.params["train_prior.train.lr"] == lr
        assert by_name["train_prior"].data.tags["mlflow.parentRunId"] == by_name[f"experiment {name}"].info.run_id
        assert all(r.info.status == "FINISHED" for r in runs)

    refs = ok(["git", "ls-remote", str(origin), "refs/exps/*"]).split()[1::2]  # refs/exps/<baseline>/<name>
    assert sorted(ref.rsplit("/", 1)[1] for ref in refs) == ["grid-lr0.001", "grid-lr0.004"]

    def prior_md5(lock: str) -> str:
        (out,) = [o for o in yaml.safe_load(lock)["stages"]["train_prior"]["outs"] if o["path"] == "models/prior.pt"]
        return out["md5"]

    ok([*DVC, "exp", "pull", "origin", "grid-lr0.004"])  # the git ref, and its outputs from the DVC remote
    ref = [r for r in refs if r.endswith("/grid-lr0.004")][0]
    md5 = prior_md5(ok(["git", "show", f"{ref}:dvc.lock"]))
    assert md5 != prior_md5((user / "dvc.lock").read_text())  # another model than the baseline's
    assert (user / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).is_file()
    assert yaml.safe_load(ok(["git", "show", f"{ref}:params.yaml"]))["train_prior"]["train"]["lr"] == 0.004


def test_queued_experiments_run_two_at_a_time_into_the_server_under_their_names(services, baseline, tmp_path):
    """A teammate clones the baseline, pulls its outputs and runs two queued experiments two at a time (`dvc queue
    start -j 2`, DVC's own workers, with MLFLOW_TRACKING_URI naming the server): each experiment's train_prior run
    lands in the server tagged with its name, nothing upstream runs again, and no local store appears."""
    from mlflow.tracking import MlflowClient

    mate, env = tmp_path / "mate", baseline.env
    run_ok(["git", "clone", "-q", str(baseline.origin), str(mate)], tmp_path, env)
    run_ok([*DVC, "remote", "modify", "--local", "storage", "url", str(baseline.remote)], mate, env)
    run_ok([*DVC, "pull", "--with-deps", "train_prior"], mate, env)  # what the baseline ran
    lrs = {"queue-lr0.0005": "0.0005", "queue-lr0.004": "0.004"}
    for name, lr in lrs.items():
        run_ok([*DVC, "exp", "run", "--queue", "-n", name, "-S", f"train_prior.train.lr={lr}", "train_prior"], mate,
               env)
    status = run_dvc_queue(mate, env)
    assert status.count("Success") == 2, status

    client = MlflowClient(services.mlflow)
    experiment = client.get_experiment_by_name("vqprior").experiment_id
    runs = client.search_runs([experiment], "tags.`dvc.exp` LIKE 'queue-%'")
    assert sorted((r.info.run_name, r.data.tags["dvc.exp"], r.data.params["train_prior.train.lr"], r.info.status)
                  for r in runs) == [("train_prior", name, lr, "FINISHED") for name, lr in sorted(lrs.items())]
    assert not (mate / "mlflow.db").exists() and not list((mate / ".dvc/tmp").rglob("mlflow.db"))


def test_mlflow_login_stops_strangers_in_one_line_and_records_a_members_runs(services, tmp_path, monkeypatch):
    """`MLFLOW_AUTH=true`: MLflow's basic-auth app, its accounts in PostgreSQL. A stage without a login, or with a
    wrong password, stops in seconds with one line before any work; an account the admin made runs it, and its run,
    with the DVC hash of what it wrote, reads back with that login."""
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient
    from stages._tracking import dvc_md5

    require_fashion_mnist()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    folder = tmp_path / "login-services"
    env = services.env | {"VQPRIOR_SERVICES_DIR": str(folder), "MLFLOW_PORT": str(port), "MLFLOW_AUTH": "true",
                          "MLFLOW_ADMIN_PASSWORD": "admin-pw-for-the-test", "MLFLOW_DB": "mlflow_login",
                          "MLFLOW_AUTH_DB": "mlflow_login_accounts"}

    def services_sh(*args):
        return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)

    try:
        started = services_sh("start", "mlflow")
        assert started.returncode == 0 and "login required" in started.stdout, started.stdout + started.stderr[-2000:]
        assert (folder / "mlflow-auth.ini").stat().st_mode & 0o077 == 0  # it holds the admin password
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "admin-pw-for-the-test")
        get_app_client("basic-auth", tracking_uri=url).create_user("alice", "alice-password-for-the-test")
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")  # the stages below see only the login each case gives them
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")

        repo = copy_repo(tmp_path / "repo")
        (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
        refusal = (f"error: tracking server {url} refused the login (UNAUTHENTICATED): set MLFLOW_TRACKING_USERNAME and "
                   "MLFLOW_TRACKING_PASSWORD to an account that may edit the experiment")
        for login in ({}, {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "wrong"}):
            t0 = time.monotonic()
            stranger = run([sys.executable, "-m", "stages.prepare"], repo, {"MLFLOW_TRACKING_URI": url, **login})
            assert stranger.returncode == 1 and stranger.stderr.strip().splitlines() == [refusal], stranger.stderr
            assert time.monotonic() - t0 < 60 and not (repo / "data/prepared").exists()

        alice = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "alice-password-for-the-test"}
        member = run([sys.executable, "-m", "stages.prepare"], repo, {"MLFLOW_TRACKING_URI": url, **alice})
        assert member.returncode == 0, member.stderr[-2000:]
        for key, value in alice.items():
            monkeypatch.setenv(key, value)
        client = MlflowClient(url)
        (prepared,) = client.search_runs([client.get_experiment_by_name("vqprior").experiment_id])
        assert prepared.info.status == "FINISHED"
        assert prepared.data.tags["dvc.out.data/prepared"] == dvc_md5(repo / "data/prepared")
    finally:
        services_sh("stop", "mlflow")
