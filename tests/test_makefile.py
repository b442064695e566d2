"""The Makefile's own checks, run by make itself in a scratch folder (no install happens)."""
import shutil
from pathlib import Path

from conftest import ROOT, run


def make_install(folder: Path, *overrides: str):
    """`make install` with the project's Makefile in an otherwise empty project folder."""
    shutil.copy(ROOT / "Makefile", folder / "Makefile")
    for prerequisite in ("pyproject.toml", "constraints.txt"):  # the venv's recipe depends on both
        (folder / prerequisite).write_text("")
    return run(["make", "install", *overrides], folder, timeout=60)


def test_install_stops_with_one_line_when_the_disk_cannot_hold_the_venv(tmp_path):
    done = make_install(tmp_path, "VENV_GB=1000000")  # more than any disk here holds
    assert done.returncode != 0
    message = [line for line in done.stderr.splitlines() if line.startswith("make install:")]
    assert len(message) == 1, done.stderr
    assert "GB more disk" in message[0] and "GB is free under" in message[0]
    assert not (tmp_path / ".venv").exists()


def test_install_check_passes_when_the_disk_has_room(tmp_path):
    # 0 GB needed passes the check; PYTHON=false then stops the recipe at the venv step, before any install
    done = make_install(tmp_path, "VENV_GB=0", "PYTHON=false")
    assert "GB more disk" not in done.stderr
    assert "false -m venv .venv" in done.stdout
