"""sweep: gather the scored grid points (stage `sweep_point`) into one table, plot it, and name the best point by FID.

Writes metrics/sweep.json ({"points": [...], "best": index, ...}), plots/sweep.csv and reports/sweep.png
(precision against recall, FID against temperature). Only the points of the current grid count: folders left by
points since removed from params.yaml are ignored.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

from stages._cli import speaks
from stages._tracking import tracked_run
from vqprior.config import SweepParams, load_params
from vqprior.figures import plt, save_figure
from vqprior.io import write_json_atomic
from vqprior.plots import write_csv

POINTS = Path("data/sweep")
COLUMNS = ("temperature", "top_k", "top_p", "guidance", "fid", "kid", "precision", "recall", "f_score", "num_samples",
           "unique_codes_used")


def grid(cfg: SweepParams) -> list[tuple[float, int, float, float]]:
    return list(itertools.product(cfg.temperature, cfg.top_k, cfg.top_p, cfg.guidance))


def read_points(cfg: SweepParams, folder: Path = POINTS) -> list[dict]:
    """The scores of every grid point, in grid order; a missing point is an error naming the stage to run."""
    found = {}
    for path in sorted(folder.glob("*/scores.json")):
        s = json.loads(path.read_text())
        found[(s["temperature"], s["top_k"], s["top_p"], s.get("guidance"))] = s
    missing = [point for point in grid(cfg) if point not in found]
    if missing:
        raise SystemExit(f"error: no scores under {folder}/ for grid point(s) (temperature, top_k, top_p, guidance) "
                         f"{missing}; run `dvc repro sweep` (it runs the sweep_point stages first)")
    return [{k: found[point].get(k) for k in COLUMNS} for point in grid(cfg)]


def describe(pt: dict) -> str:
    return (f"T={pt['temperature']:<5} top_k={pt['top_k']:<4} top_p={pt['top_p']:<5} guidance={pt['guidance']:<5} "
            f"FID {pt['fid']:7.2f}  precision {pt['precision']:.3f}  recall {pt['recall']:.3f}")


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
        points = read_points(p.sweep)
        best = min(range(len(points)), key=lambda i: points[i]["fid"])
        summary = {"points": points, "best": best, "criterion": "lowest fid", "best_point": points[best]}
        write_json_atomic("metrics/sweep.json", summary)
        write_csv("plots/sweep.csv", points)
        plot(points, best, "reports/sweep.png")
        run.log_metrics({f"best_{k}": v for k, v in points[best].items() if v is not None})
        for path in ("metrics/sweep.json", "plots/sweep.csv", "reports/sweep.png"):
            run.log_artifact(path)
        print(f"sweep: {len(points)} points; best by FID: {describe(points[best])}")
        for pt in points:
            print(f"  {describe(pt)}")


if __name__ == "__main__":
    main()
