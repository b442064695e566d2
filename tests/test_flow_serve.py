"""The README's scheduling path for real: `prefect server start`, then `python -m flows.pipeline --serve --cron ...`.

The test starts its own server (fresh SQLite database under a temporary PREFECT_HOME, on a free port), serves the
flow from a copy of the repo, reads the deployment back through Prefect's client, then stops serve (which must
pause the schedule, as the README says) and the server. No flow run is triggered: that would run the whole DAG.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import copy_repo, subprocess_env

CRON = "0 3 * * *"
DEPLOYMENT = "vqprior-nightly"  # flows.pipeline's default --name
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "COLUMNS": "400"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    # its own session, so stopping it also reaches whatever it started (uvicorn, the runner's children)
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen, first: int = signal.SIGTERM, grace: float = 20) -> None:
    """`first` to the process, then SIGTERM and SIGKILL to the session it leads, until nothing of it is left."""
    for sig in (first, signal.SIGTERM, signal.SIGKILL):
        try:
            if sig == first:
                proc.send_signal(sig)
            else:
                os.killpg(proc.pid, sig)  # the group this test created (start_new_session): its id is proc.pid
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; end any child still in its group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def prefect_server(tmp_path) -> Iterator[str]:
    """A `prefect server start` of this test's own, on 127.0.0.1 and a free port; yields its API url."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "server.log"
    env = subprocess_env(tmp_path, {**QUIET, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api})
    prefect = Path(sys.executable).parent / "prefect"
    server = _start([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)], tmp_path, env, log)
    try:
        deadline = time.monotonic() + 120  # the first start runs the database migrations
        while not _healthy(api):
            if server.poll() is not None:
                pytest.fail(f"`prefect server start` exited with {server.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"the Prefect server did not answer {api}/health within 120 s:\n{_tail(log)}")
            time.sleep(1)
        yield api
    finally:
        _stop(server)


@contextmanager
def _client(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def _deployments(api: str) -> list:
    with _client(api) as client:
        return client.read_deployments()


def test_serve_registers_a_cron_deployment_and_stopping_pauses_it(prefect_server, tmp_path):
    from prefect.client.schemas.objects import DeploymentStatus
    from prefect.client.schemas.schedules import CronSchedule

    from flows.pipeline import pipeline

    api = prefect_server
    copy = copy_repo(tmp_path / "repo")
    log = tmp_path / "serve.log"
    env = subprocess_env(copy, {**QUIET, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api})
    serve = _start([sys.executable, "-m", "flows.pipeline", "--serve", "--cron", CRON], copy, env, log)
    try:
        # serve first creates the deployment, then polls the server for its runs, which marks it READY;
        # only a polling runner pauses the schedule when stopped, so wait for both
        deadline = time.monotonic() + 60
        while not ((deployments := _deployments(api)) and deployments[0].status == DeploymentStatus.READY):
            if serve.poll() is not None:
                pytest.fail(f"`--serve` exited with {serve.returncode}; deployments: {deployments}\n{_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"no READY deployment 60 s after `--serve` started: {deployments}\n{_tail(log)}")
            time.sleep(1)

        assert len(deployments) == 1
        deployment = deployments[0]
        assert deployment.name == DEPLOYMENT
        assert deployment.paused is False
        assert deployment.last_polled is not None
        assert deployment.entrypoint == "flows/pipeline.py:pipeline"  # what the runner loads for a run
        assert deployment.parameters == {"stages": None, "retries": 1}
        assert len(deployment.schedules) == 1
        schedule = deployment.schedules[0]
        assert schedule.active is True
        assert isinstance(schedule.schedule, CronSchedule)
        assert schedule.schedule.cron == CRON
        with _client(api) as client:
            assert client.read_flow(deployment.flow_id).name == pipeline.name == "vqprior-pipeline"
        assert serve.poll() is None, f"`--serve` stopped on its own:\n{_tail(log)}"

        _stop(serve, first=signal.SIGINT)  # Ctrl-C, as a user stops it
        assert serve.returncode == 0, f"`--serve` did not exit cleanly on Ctrl-C:\n{_tail(log)}"
        (deployment,) = _deployments(api)
        assert deployment.paused is True, f"stopping serve did not pause the schedule:\n{_tail(log)}"
    finally:
        _stop(serve, first=signal.SIGINT)
