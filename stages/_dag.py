"""The pipeline's stages in DAG order, from DVC's own graph (no Prefect here, so `make times` stays quick)."""
from __future__ import annotations

from pathlib import Path


def stage_order(root: str | Path = ".") -> list[str]:
    """The pipeline's stages as DVC itself expands and links them, in topological order.

    A matrix/foreach stage gives one entry per item (e.g. `sweep_point@1.0-0-1.0`); among ready stages the
    order of dvc.yaml decides, so the result is stable.
    """
    from dvc.exceptions import CyclicGraphError
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        try:
            graph = repo.index.graph  # edges run from a stage to the stages it depends on
        except CyclicGraphError as exc:
            raise ValueError(f"dvc.yaml has a cycle among stages: {exc}") from None
        stages = [s for s in repo.index.stages if s.cmd]  # dvc.yaml stages, not `dvc add`ed files
        names = [s.name for s in stages]
        upstream = {s.name: {d.name for d in graph.successors(s) if d.cmd} for s in stages}
    order: list[str] = []
    while len(order) < len(names):
        ready = [name for name in names if name not in order and upstream[name] <= set(order)]
        order.append(ready[0])  # DVC has ruled out cycles, so one is always ready
    return order


def select(stages: list[str] | None = None) -> list[str]:
    """The named stages (all when None) in DAG order; a matrix stage's name selects all its points.
    An unknown name is an error."""
    order = stage_order()
    groups = {name.split("@")[0] for name in order}
    unknown = set(stages or []) - set(order) - groups
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; dvc.yaml has {order}")
    return [s for s in order if not stages or s in stages or s.split("@")[0] in stages]
