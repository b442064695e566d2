"""push_runs: `dvc push --run-cache`, plus the files its records point at, so that another clone can restore any stage
run from the remote instead of running it (not a DVC stage).

    python -m stages.push_runs                # the default remote (`make push`)
    python -m stages.push_runs --remote team

`dvc push --run-cache` sends the run records (.dvc/cache/runs) and the outputs of the workspace's dvc.lock, but not
the other outputs those records name: an experiment's models once the workspace has moved on, and every metrics and
plots file (they are `cache: false` outputs, kept in git, which DVC copies into the local cache for the run cache
without ever pushing them). Another clone whose params match such a record then finds it and still runs the stage.
Here every object a record names that this clone's cache holds goes to the remote too, with DVC's own transfer.

Another clone then reuses them the standard way: `dvc pull --run-cache`, then `dvc repro --pull` (which fetches what
a matching record names)."""
from __future__ import annotations

import argparse

from stages._cli import speaks
from vqprior.errors import VqpriorError


class PushFailed(VqpriorError):
    """Some objects could not be sent; the message names how many and what to check."""


def push_runs(remote: str | None = None) -> dict:
    """Push the workspace's outputs, the run records and every object they name; counts of what was sent."""
    from dvc.repo import Repo

    with Repo() as repo:
        records = repo.stage_cache.push(remote)  # [(stage key, record)], all of them, as `--run-cache` sends them
        named = set()
        for objs in repo.stage_cache.get_used_objs(records).values():
            named |= set(objs)
        # a record may name an object this clone no longer holds (`dvc gc`, or a run made elsewhere): skip it
        held = {h for h in named if (repo.cache.local if h.name == "md5" else repo.cache.legacy).exists(h.value)}
        sent = repo.cloud.push(held, remote=remote)
        workspace = repo.push(remote=remote)
    if sent.failed:
        raise PushFailed(f"{len(sent.failed)} of the run records' objects did not reach the remote; check that "
                         f"`dvc remote list` points at a writable store and run `make push` again")
    return {"records": len(records), "objects": len(sent.transferred), "skipped": len(named - held),
            "workspace": workspace}


@speaks
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--remote", help="a remote's name from `dvc remote list` (default: the project's default)")
    counts = push_runs(parser.parse_args().remote)
    print(f"pushed {counts['records']} run records, {counts['objects']} objects they name "
          f"({counts['skipped']} not in this clone's cache), {counts['workspace']} workspace files")


if __name__ == "__main__":
    main()
