"""The Makefile's own checks, run by make itself in a scratch folder (no install happens)."""
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_install_stops_with_one_line_when_the_disk_cannot_hold_the_venv(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    # more than any disk here holds: the check must refuse before creating the venv
    done = subprocess.run(["make", "install", "VENV_GB=1000000"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    message = [line for line in done.stderr.splitlines() if line.startswith("make install:")]
    assert len(message) == 1, done.stderr
    assert "GB more disk" in message[0] and "GB is free under" in message[0]
    assert not (tmp_path / ".venv").exists()


def test_install_check_passes_when_the_disk_has_room(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    # 0 GB needed passes the check; PYTHON=false then stops the recipe at its next line, before any install
    done = subprocess.run(["make", "install", "VENV_GB=0", "PYTHON=false"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    # past the disk check, the venv step is reached and fails on PYTHON=false, not on disk
    assert "GB more disk" not in done.stderr
    assert "false -m venv .venv" in done.stdout
