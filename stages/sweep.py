"""sweep: gather the scored grid points (stage `sweep_point`) into one table, plot it, and name the best point by FID.

The point `sample` drew and `evaluate` scored is a row of the table too (marked `evaluate`), so the grid need not
repeat it. The default grid is empty (each point costs the Inception time of a sample set): the table then holds
`evaluate`'s point alone, until params.yaml's `sweep` lists values.
Writes metrics/sweep.json (the best point's `fid`, `precision`, `recall`), reports/sweep_detail.json (the same as
`best_fid`, ..., its settings `best_temperature`, ..., and {"points": [...], "best": index, "criterion": ...}),
plots/sweep.csv and reports/sweep.png
(precision against recall, FID against temperature). Only the points of the current grid count: folders left by
points since removed from params.yaml are ignored.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

from stages._cli import speaks
from stages._tracking import tracked_run
from stages import _paths as paths
from vqprior.config import SampleParams, SweepParams, load_params
from vqprior.errors import require
from vqprior.figures import plt, save_figure
from vqprior.io import write_csv, write_report

# evaluate's point: what `sample` drew and `evaluate` scored (each stage's detail report holds all its numbers)
SAMPLE_REPORT = paths.REPORTS["sample"]
EVALUATE_REPORT = paths.REPORTS["evaluate"]
COLUMNS = ("temperature", "top_k", "top_p", "guidance", "fid", "kid", "precision", "recall", "f_score", "num_samples",
           "unique_codes_used", "source")
SETTINGS = ("temperature", "top_k", "top_p", "guidance")
BEST_COLUMNS = ("temperature", "top_k", "top_p", "guidance", "fid", "precision", "recall")  # the best point's
HEADLINE = {"fid": "best_fid", "precision": "best_precision", "recall": "best_recall"}  # metrics/ column -> key


def grid(cfg: SweepParams) -> list[tuple[float, int, float, float]]:
    return list(itertools.product(cfg.temperature, cfg.top_k, cfg.top_p, cfg.guidance))


def read_points(cfg: SweepParams, folder: Path = paths.SWEEP_POINTS) -> list[dict]:
    """The scores of every grid point, in grid order; a missing point is an error naming the stage to run."""
    found = {}
    for path in sorted(folder.glob("*/scores.json")):
        s = json.loads(path.read_text())
        found[(s["temperature"], s["top_k"], s["top_p"], s.get("guidance"))] = s
    missing = [point for point in grid(cfg) if point not in found]
    if missing:
        raise SystemExit(f"error: no scores under {folder}/ for grid point(s) (temperature, top_k, top_p, guidance) "
                         f"{missing}; run `dvc repro sweep` (it runs the sweep_point stages first)")
    return [{k: found[point].get(k) for k in COLUMNS} | {"source": "sweep_point"} for point in grid(cfg)]


def evaluated_point(settings: SampleParams, sample=SAMPLE_REPORT, evaluate=EVALUATE_REPORT) -> dict:
    """The row of `sample`'s own settings with `evaluate`'s scores of its headline set."""
    drawn, scores = (json.loads(require(r.detail, stage).read_text()) for r, stage in ((sample, "sample"),
                                                                                      (evaluate, "evaluate")))
    return ({k: scores.get(k) for k in COLUMNS} | {k: getattr(settings, k) for k in SETTINGS}
            | {"unique_codes_used": drawn.get("unique_codes_used"), "source": "evaluate"})


def all_points(cfg: SweepParams, settings: SampleParams, folder: Path = paths.SWEEP_POINTS, sample=SAMPLE_REPORT,
               evaluate=EVALUATE_REPORT) -> list[dict]:
    """The grid's points, and `evaluate`'s point first unless the grid holds the same settings."""
    points = read_points(cfg, folder)
    ev = evaluated_point(settings, sample, evaluate)
    same = any(all(pt[k] == ev[k] for k in SETTINGS) for pt in points)
    return points if same else [ev, *points]


def describe(pt: dict) -> str:
    return (f"T={pt['temperature']:<5} top_k={pt['top_k']:<4} top_p={pt['top_p']:<5} guidance={pt['guidance']:<5} "
            f"FID {pt['fid']:7.2f}  precision {pt['precision']:.3f}  recall {pt['recall']:.3f}  ({pt['source']})")


def plot(points: list[dict], best: int, path: str | Path) -> None:
    fig, (pr, ft) = plt.subplots(1, 2, figsize=(10, 4))
    for i, pt in enumerate(points):
        pr.scatter(pt["recall"], pt["precision"], marker="*" if i == best else "o", s=120 if i == best else 40)
        name = f"T{pt['temperature']} k{pt['top_k']} p{pt['top_p']} g{pt['guidance']}"
        pr.annotate(name, (pt["recall"], pt["precision"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    pr.set(xlabel="recall", ylabel="precision", title="precision vs recall (star: best FID)")

    def line(q):  # the points FID is drawn against temperature for
        return q["top_k"], q["top_p"], q["guidance"]

    for (k, p, g), group in itertools.groupby(sorted(points, key=lambda q: (*line(q), q["temperature"])), key=line):
        group = list(group)
        ft.plot([q["temperature"] for q in group], [q["fid"] for q in group], marker="o",
                label=f"top_k {k}, top_p {p}, guidance {g}")
    ft.set(xlabel="temperature", ylabel="FID", title="FID vs temperature")
    ft.legend(fontsize=8)
    save_figure(fig, path)


@speaks
def main() -> None:
    p = load_params()
    with tracked_run("sweep", p) as run:
        points = all_points(p.sweep, p.sample)
        best = min(range(len(points)), key=lambda i: points[i]["fid"])
        best_point = {f"best_{k}": points[best][k] for k in BEST_COLUMNS}
        summary = best_point | {"points": points, "best": best, "criterion": "lowest fid"}
        write_report(*paths.REPORTS["sweep"], summary, HEADLINE)
        write_csv("plots/sweep.csv", points)
        plot(points, best, "reports/sweep.png")
        run.log_metrics({f"best_{k}": v for k, v in points[best].items() if v is not None})
        for path in (*paths.REPORTS["sweep"], "plots/sweep.csv", "reports/sweep.png"):
            run.log_artifact(path)
        grid_note = "" if grid(p.sweep) else " (params.yaml's sweep grid is empty)"
        print(f"sweep: {len(points)} point(s){grid_note}; best by FID: {describe(points[best])}")
        for pt in points:
            print(f"  {describe(pt)}")


if __name__ == "__main__":
    main()
