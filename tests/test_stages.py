"""Stages fail fast and clearly on bad input, before heavy work."""
import sys

import yaml

from conftest import ROOT, run


def stage(name, cwd):
    return run([sys.executable, "-m", f"stages.{name}"], cwd, env={"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}, timeout=120)


def test_bad_param_stops_the_stage_with_one_line(tmp_path):
    params = yaml.safe_load((ROOT / "profiles/smoke.yaml").read_text())
    params["train_vqvae"]["train"]["lr"] = -0.1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = stage("train_vqvae", tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train_vqvae.train.lr" in lines[0] and "greater than 0" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()  # stopped before tracking or any work


def test_missing_input_names_the_stage_to_run(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "profiles/smoke.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    result = stage("train_prior", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: data/codes/train.parquet not found; run `dvc repro extract_codes` first"
