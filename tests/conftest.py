import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def require_fashion_mnist() -> Path:
    """Debian's Fashion-MNIST folder; tests that check real-data numbers fail without it (never skip quietly)."""
    from vqprior.data.sources import DEBIAN_FASHION_MNIST
    if not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST IDX files not found under {DEBIAN_FASHION_MNIST}: run `make data` "
                    "(installs Debian's dataset-fashion-mnist), as `make test` does", pytrace=False)
    return DEBIAN_FASHION_MNIST


def params_with(changes: dict | None = None, base: str = "profiles/smoke.yaml") -> dict:
    """A complete params dict: `base` with `changes` merged in key by key. The typed params have no defaults (the
    params files are their one source), so a test starts from a whole file and names only what it changes."""
    def merge(into: dict, extra: dict) -> dict:
        return into | {k: merge(into.get(k, {}), v) if isinstance(v, dict) else v for k, v in extra.items()}

    return merge(yaml.safe_load((ROOT / base).read_text()), changes or {})


def stage_report(root: Path, name: str) -> dict:
    """All a stage reported (reports/<name>_detail.json); where it has a headline file, that holds some of these
    numbers under its short names."""
    detail = json.loads((root / f"reports/{name}_detail.json").read_text())
    headline = root / f"metrics/{name}.json"
    if headline.exists():
        shown = json.loads(headline.read_text())
        assert all(v in detail.values() for v in shown.values()), f"{name}: headline {shown} not all in the detail"
    return detail


GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def copy_repo(dest: Path, params: str = "profiles/smoke.yaml") -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    """A working copy of the project as a user would clone it (tracked + new files), with `params` as params.yaml."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    shutil.copy(ROOT / params, dest / "params.yaml")
    for stale in ("dvc.lock", "metrics", "plots", "reports"):  # start as if nothing had run
        path = dest / stale
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    env = {**os.environ, **GIT_ENV}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def subprocess_env(cwd: Path, env: dict | None = None) -> dict:
    """This interpreter's environment first on PATH (so `dvc` calls the venv's python), the code of `cwd`."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "VQPRIOR_PARENT_RUN_ID")}
    return full_env | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        # the code of the folder under test, not the editable install's
        "PYTHONPATH": f"{cwd / 'src'}{os.pathsep}{cwd}",
        **(env or {}),
    }


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(cwd, env), capture_output=True, text=True, timeout=timeout)


DVC = [sys.executable, "-m", "dvc"]  # the venv's DVC, whatever PATH holds


def run_ok(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`run`, failing the test with the output's tails unless the command succeeded."""
    done = run(cmd, cwd, env)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done


def stages_run(done: subprocess.CompletedProcess) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` ran, in its order (its "Running stage '...'" lines)."""
    return [line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")]


def run_dvc_queue(repo: Path, env: dict | None = None, jobs: int = 2, timeout: float = 600) -> str:
    """`dvc queue start -j jobs`, then `dvc queue status` until nothing is queued or running: that last status.
    The queue's workers are stopped afterwards, since DVC can leave one running for good (docs/team.md)."""
    log = repo / ".dvc" / "tmp" / "queue-start.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:  # a file, not a pipe: every worker inherits it, and a pipe stays open while one lives
        started = subprocess.run([*DVC, "queue", "start", "-j", str(jobs)], cwd=repo, env=subprocess_env(repo, env),
                                 stdout=out, stderr=subprocess.STDOUT, timeout=300)
    assert started.returncode == 0, log.read_text()[-3000:]
    try:
        deadline = time.monotonic() + timeout
        while "Queued" in (status := run_ok([*DVC, "queue", "status"], repo, env).stdout) or "Running" in status:
            assert time.monotonic() < deadline, status + queue_worker_logs(repo)
            time.sleep(3)
        return status
    finally:
        stop_queue_workers(repo)


QUEUE_WORKERS = ".dvc/tmp/exps/celery"  # where DVC keeps each queue worker's log (.out) and pid file (.pid)


def queue_worker_logs(repo: Path) -> str:
    return "".join(f"\n--- {out.name}\n{out.read_text(errors='replace')[-2000:]}"
                   for out in sorted((repo / QUEUE_WORKERS).glob("*.out")))


def stop_queue_workers(repo: Path, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL, every DVC queue worker of `repo` still alive (by the pid files DVC writes for them)."""
    alive = []
    for pidfile in (repo / QUEUE_WORKERS).glob("*.pid"):
        pid = int(pidfile.read_text() or 0)
        try:
            if pid and b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGTERM)
                alive.append(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    deadline = time.monotonic() + grace
    while (alive := [pid for pid in alive if Path(f"/proc/{pid}").exists()]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_until(ready, proc: subprocess.Popen, what: str, timeout: float = 300, poll: float = 0.02) -> None:
    """Wait for `ready()` while `proc` runs: ending first, or `timeout` seconds, fails the test."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"{what} ended first"
        assert time.monotonic() < deadline, f"{what}: not ready after {timeout} s"
        time.sleep(poll)


@pytest.fixture(scope="session")
def smoke_repo(tmp_path_factory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("smoke") / "repo")
