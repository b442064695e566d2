"""Where the time of the last run went: one row per stage, from MLflow's run times (not a DVC stage).

    python -m stages.times          # or `make times`
    python -m stages.times --markdown

A stage DVC skipped (its outputs were cached) has no new MLflow run, so each row is the latest run of that stage,
and the date column says when it finished. Only the stages dvc.yaml expands to now count: a sweep point since
removed from the grid keeps its MLflow runs but no row. Inception images are those the stage pushed through the
network (the metric `inception_images`); precision is the one the stage ran in.
"""
from __future__ import annotations

import argparse
from datetime import datetime

from stages._dag import stage_order
from stages._tracking import PRECISION_TAGS, ensure_experiment
from vqprior.config import load_params

COLUMNS = ("stage", "minutes", "status", "finished", "precision", "inception images")


def latest_stage_runs(experiment: str) -> list[dict]:
    """The latest MLflow run of every stage (every sweep point counts as its own), oldest first."""
    import mlflow

    experiment_id = ensure_experiment(experiment)
    runs = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list",
                              filter_string="tags.`dvc.stage` != ''", order_by=["attributes.start_time DESC"])
    latest = {}
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        name = tags.get("dvc.stage", "")
        if name == "sweep_point":
            name += "@" + "-".join(tags.get(f"sweep.{k}", "?") for k in ("temperature", "top_k", "top_p", "guidance"))
        if not name or name in latest:
            continue
        end = run.info.end_time
        latest[name] = {
            "stage": name, "start": run.info.start_time,
            "seconds": (end - run.info.start_time) / 1000 if end else None,
            "status": run.info.status, "finished": datetime.fromtimestamp(end / 1000) if end else None,
            "precision": "/".join(tags[t] for t in PRECISION_TAGS if t in tags),
            "inception images": int(metrics["inception_images"]) if "inception_images" in metrics else None,
        }
    return sorted(latest.values(), key=lambda r: r["start"])


def table(rows: list[dict], markdown: bool = False) -> str:
    def cells(r):
        return [r["stage"], "" if r["seconds"] is None else f"{r['seconds'] / 60:.1f}", r["status"],
                r["finished"].strftime("%Y-%m-%d %H:%M") if r["finished"] else "", r["precision"],
                "" if r["inception images"] is None else f"{r['inception images']:,}"]

    total_s = sum(r["seconds"] or 0 for r in rows)
    total_i = sum(r["inception images"] or 0 for r in rows)
    body = [cells(r) for r in rows] + [["total", f"{total_s / 60:.1f}", "", "", "", f"{total_i:,}"]]
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *body)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*COLUMNS)] + [fmt.format(*row) for row in body])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="a Markdown table (as in the README)")
    args = parser.parse_args(argv)
    current = set(stage_order())  # today's grid: a removed sweep point's old runs do not count
    rows = [r for r in latest_stage_runs(load_params().tracking.experiment) if r["stage"] in current]
    if not rows:
        raise SystemExit("times: no stage runs in the MLflow store yet; run `make run` first")
    print(table(rows, args.markdown))


if __name__ == "__main__":
    main()
