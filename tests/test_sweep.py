"""The sweep's table: the current grid's points in grid order, stale points ignored, a missing point named."""
import json

import pytest

from conftest import params_with
from stages._paths import Report
from stages.sweep import all_points, grid, read_points
from vqprior.config import ParamsError, SweepParams, parse_params
from vqprior.io import write_report


def _write_point(folder, t, k, p, fid, g=1.0):
    path = folder / f"t{t}-k{k}-p{p}-g{g}" / "scores.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"temperature": t, "top_k": k, "top_p": p, "guidance": g, "fid": fid, "precision": 0.5,
                                "recall": 0.4, "num_samples": 10, "protocol": "not a column"}))


def test_read_points_follows_the_grid_and_ignores_stale_points(tmp_path):
    cfg = SweepParams(temperature=[1.0, 0.8], top_k=[0], top_p=[1.0, 0.9], guidance=[1.0, 2.0])
    assert grid(cfg)[:3] == [(1.0, 0, 1.0, 1.0), (1.0, 0, 1.0, 2.0), (1.0, 0, 0.9, 1.0)] and len(grid(cfg)) == 8
    for i, (t, k, p, g) in enumerate(grid(cfg)):
        _write_point(tmp_path, t, k, p, fid=30.0 - i, g=g)
    _write_point(tmp_path, 1.5, 0, 1.0, fid=1.0)  # a point since removed from the grid
    points = read_points(cfg, tmp_path)
    assert [(q["temperature"], q["top_p"], q["guidance"], q["fid"]) for q in points] == [
        (t, p, g, 30.0 - i) for i, (t, _, p, g) in enumerate(grid(cfg))]
    assert "protocol" not in points[0] and points[0]["kid"] is None  # the table's columns only


def test_evaluate_point_is_a_row_unless_the_grid_repeats_it(tmp_path):
    """The sample settings' point was scored by `evaluate`: the table takes it from there instead of a sweep stage."""
    _write_point(tmp_path, 1.0, 0, 1.0, fid=20.0, g=1.5)
    sample, evaluate = Report(tmp_path / "sample_detail.json"), Report(tmp_path / "ev_detail.json", tmp_path / "ev.json")
    write_report(*sample, {"temperature": 1.0, "unique_codes_used": 250})
    write_report(*evaluate, {"fid": 21.5, "precision": 0.7, "recall": 0.6, "kid": 0.01, "num_samples": 10}, {"fid": "fid"})
    settings = parse_params(params_with({"sample": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "guidance": 1.0}})).sample
    cfg = SweepParams(temperature=[1.0], top_k=[0], top_p=[1.0], guidance=[1.5])
    points = all_points(cfg, settings, tmp_path, sample, evaluate)
    assert [(q["guidance"], q["fid"], q["source"]) for q in points] == [(1.0, 21.5, "evaluate"), (1.5, 20.0, "sweep_point")]
    assert points[0]["unique_codes_used"] == 250 and points[0]["recall"] == 0.6
    _write_point(tmp_path, 1.0, 0, 1.0, fid=21.4)  # the grid holds the sample settings: no second row for them
    cfg = SweepParams(temperature=[1.0], top_k=[0], top_p=[1.0], guidance=[1.0, 1.5])
    assert [q["source"] for q in all_points(cfg, settings, tmp_path, sample, evaluate)] == ["sweep_point"] * 2
    empty = SweepParams(temperature=[], top_k=[0], top_p=[1.0], guidance=[1.0])  # the default: no grid, no folders read
    assert grid(empty) == [] and read_points(empty, tmp_path / "absent") == []
    assert [(q["fid"], q["source"]) for q in all_points(empty, settings, tmp_path, sample, evaluate)] == [(21.5, "evaluate")]


def test_a_missing_point_is_named(tmp_path):
    _write_point(tmp_path, 1.0, 0, 1.0, fid=30.0)
    with pytest.raises(SystemExit, match=r"\(1\.0, 50, 1\.0, 1\.0\).*dvc repro sweep"):
        read_points(SweepParams(temperature=[1.0], top_k=[0, 50], top_p=[1.0], guidance=[1.0]), tmp_path)


@pytest.mark.parametrize("sweep, message", [
    ({"temperature": [1.0, 1.0]}, "temperature lists a value twice"),
    ({"top_p": [1.5]}, "sweep.top_p.0"),
    ({"top_k": [-1]}, "sweep.top_k.0"),
    ({"guidance": [-1.0]}, "sweep.guidance.0"),
])
def test_bad_grids_fail_at_start_up(sweep, message):
    with pytest.raises(ParamsError, match=message):
        parse_params(params_with({"sweep": sweep}))


def test_a_guidance_grid_needs_a_conditional_prior():
    with pytest.raises(ParamsError, match="unconditional prior.*keep one value"):
        parse_params(params_with({"sweep": {"guidance": [1.0, 2.0]}, "train_prior": {"model": {"num_classes": 0}}}))
    conditional = parse_params(params_with({"sweep": {"guidance": [1.0, 2.0]},
                                            "train_prior": {"model": {"num_classes": 10}}}))
    assert conditional.sweep.guidance == [1.0, 2.0]
