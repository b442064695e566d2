"""The Prefect pipeline: stage order derived from dvc.yaml, and one real run of `prepare` in a copy of the repo."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from conftest import copy_repo, run
from flows.experiment import expand_grid
from stages._dag import select, stage_order
from vqprior.config import load_params

REPO = Path(__file__).resolve().parents[1]


def test_order_of_the_real_dvc_yaml_expands_the_sweep_grid():

    grid = load_params(REPO / "params.yaml").sweep
    points = [f"sweep_point@{t}-{k}-{p}-{g}" for t in grid.temperature for k in grid.top_k for p in grid.top_p
              for g in grid.guidance]
    assert stage_order(REPO) == [
        "prepare", "reference", "train_classifier", "train_vqvae", "reconstruction_fid", "extract_codes", "train_prior", "analyse_prior", "sample",
        "evaluate", *points, "sweep"]


def _write_dvc_yaml(folder: Path, stages: dict) -> Path:
    from dvc.repo import Repo

    if not (folder / ".dvc").exists():
        Repo.init(str(folder), no_scm=True).close()
    (folder / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return folder


def test_order_of_a_diamond_listed_backwards(tmp_path):
    # a -> (b, c) -> d, written in reverse so the file's order cannot be the answer
    path = _write_dvc_yaml(tmp_path, {
        "d": {"cmd": "x", "deps": ["out/b.txt", "metrics/c.json"]},                  # a metrics file is an out too
        "c": {"cmd": "x", "deps": ["./data/a/part-0.parquet"],                        # file inside an out folder
              "metrics": [{"metrics/c.json": {"cache": False}}]},
        "b": {"cmd": "x", "deps": ["data/a", "src/b.py"], "outs": [{"out/b.txt": {"persist": True}}]},
        "a": {"cmd": "x", "deps": ["src/a.py"], "outs": ["data/a"]},
        "lone": {"cmd": "x"},
    })
    order = stage_order(path)
    assert sorted(order) == ["a", "b", "c", "d", "lone"]
    assert order.index("a") < order.index("b") < order.index("d")
    assert order.index("a") < order.index("c") < order.index("d")
    assert order == ["a", "c", "b", "d", "lone"]  # among ready stages the file's order decides: stable


def test_dep_on_a_parent_folder_and_cycles(tmp_path):
    # DVC also links a stage that depends on a whole folder to the stage writing a file inside it
    path = _write_dvc_yaml(tmp_path, {
        "report": {"cmd": "x", "deps": ["models"]},
        "train": {"cmd": "x", "outs": ["models/net.pt"]},
        "unrelated": {"cmd": "x", "deps": ["models2"]},  # a prefix of the name only is no link
    })
    assert stage_order(path) == ["train", "report", "unrelated"]
    cyclic = _write_dvc_yaml(tmp_path, {"p": {"cmd": "x", "deps": ["q.txt"], "outs": ["p.txt"]},
                                        "q": {"cmd": "x", "deps": ["p.txt"], "outs": ["q.txt"]}})
    with pytest.raises(ValueError, match="cycle"):
        stage_order(cyclic)


def test_select_keeps_dag_order_and_rejects_unknown_names(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    assert select(["sample", "prepare"]) == ["prepare", "sample"]
    assert select(None)[0] == "prepare"
    with pytest.raises(ValueError, match="nope"):
        select(["nope"])
    # a matrix stage's name selects all its points (the default sweep grid is empty, so a grid of its own here)
    _write_dvc_yaml(tmp_path, {
        "point": {"matrix": {"t": [1.0, 0.9], "k": [0, 5]}, "cmd": "x", "deps": ["codes"],
                  "outs": ["sweep/t${item.t}-k${item.k}"]},
        "table": {"cmd": "x", "deps": ["sweep"]},
        "codes": {"cmd": "x", "outs": ["codes"]},
    })
    monkeypatch.chdir(tmp_path)
    assert select(["table", "point"]) == ["point@1.0-0", "point@1.0-5", "point@0.9-0", "point@0.9-5", "table"]


def _runs(copy: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{copy / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_flow_runs_prepare_in_a_copy_and_dvc_skips_it_the_second_time(tmp_path):
    copy = copy_repo(tmp_path / "repo")
    env = {
        "PREFECT_HOME": str(tmp_path / "prefect"),  # a private temporary-server database
        "COLUMNS": "400",  # Prefect's console handler wraps long lines at the terminal width
    }

    def flow(*args):
        proc = run([sys.executable, "-m", "flows.pipeline", *args], copy, env=env, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr

    rc, out = flow("--stages", "prepare")
    assert rc == 0, out
    assert (copy / "data/prepared/train.parquet").is_file()
    assert "prepare: splits" in out  # the stage's own print, streamed through Prefect's logger
    assert "train_vqvae" not in out  # only the selected stage ran

    runs = _runs(copy)
    pipelines = [r for r in runs if r.info.run_name == "pipeline"]
    prepares = [r for r in runs if r.info.run_name == "prepare"]
    assert len(pipelines) == 1 and len(prepares) == 1
    assert pipelines[0].info.status == "FINISHED"
    assert pipelines[0].data.tags["stages"] == "prepare"
    assert pipelines[0].data.tags["prefect.flow_run_id"]
    assert prepares[0].data.tags["mlflow.parentRunId"] == pipelines[0].info.run_id
    assert prepares[0].info.experiment_id == pipelines[0].info.experiment_id

    rc, out = flow("--stages", "prepare")
    assert rc == 0, out
    assert "Stage 'prepare' didn't change, skipping" in out
    assert "prepare: splits" not in out
    runs = _runs(copy)
    assert sum(r.info.run_name == "pipeline" for r in runs) == 2
    assert sum(r.info.run_name == "prepare" for r in runs) == 1  # DVC skipped it: no second stage run


def test_experiment_grid_is_every_combination_with_names_git_allows():
    grid = expand_grid(["train_prior.train.lr=0.001,0.004", "sample.temperature=0.9,1.0"], "grid")
    assert grid == [
        ("grid-lr0.001-temperature0.9", ["train_prior.train.lr=0.001", "sample.temperature=0.9"]),
        ("grid-lr0.001-temperature1.0", ["train_prior.train.lr=0.001", "sample.temperature=1.0"]),
        ("grid-lr0.004-temperature0.9", ["train_prior.train.lr=0.004", "sample.temperature=0.9"]),
        ("grid-lr0.004-temperature1.0", ["train_prior.train.lr=0.004", "sample.temperature=1.0"]),
    ]
    assert expand_grid(["evaluate.feature_extractor=inception v3"], "my run")[0][0] == "my_run-feature_extractorinception_v3"


@pytest.mark.parametrize("sets, said", [
    (["train_prior.train.lr"], "-S 'train_prior.train.lr': write KEY=VALUE or KEY=V1,V2,..."),
    (["train_prior.train.lr=0.001,"], "-S 'train_prior.train.lr=0.001,': write KEY=VALUE or KEY=V1,V2,..."),
    (["seed=1", "seed=2"], "a key is given twice: list all its values in one -S KEY=V1,V2"),
])
def test_a_bad_grid_is_one_line_before_any_server_is_asked(sets, said, tmp_path):
    with pytest.raises(ValueError) as raised:
        expand_grid(sets, "grid")
    assert str(raised.value).startswith(said)
    repo = copy_repo(tmp_path / "repo")
    args = [a for s in sets for a in ("-S", s)]
    done = run([sys.executable, "-m", "flows.experiment", *args], repo, {"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [f"error: {raised.value}"], done.stderr


def test_experiments_on_workers_need_a_prefect_server(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    dry = run([sys.executable, "-m", "flows.experiment", "-S", "seed=1,2", "--dry-run"], repo)
    assert dry.returncode == 0 and dry.stdout.splitlines() == ["grid-seed1: seed=1", "grid-seed2: seed=2"]
    done = run([sys.executable, "-m", "flows.experiment", "-S", "seed=1,2"], repo)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: experiments on workers need a Prefect server: run `make services` (or `prefect server start`), then "
        "export PREFECT_API_URL=http://127.0.0.1:4200/api"], done.stderr
