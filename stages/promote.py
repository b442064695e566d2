"""promote: move the `champion` alias of the registered generator to a version, only when that version's FID is
better than the champion's under the same evaluation protocol (not a DVC stage; `evaluate` registers the versions).

    python -m stages.promote                # the latest version
    python -m stages.promote --version 7
    python -m stages.promote --alias production

Exit status 0 when the alias points at the version afterwards (promoted, or it already did), 1 when it was refused
(worse or equal FID, another protocol) or there is nothing to promote."""
from __future__ import annotations

import argparse
import json

from stages._cli import speaks
from stages._registry import CHAMPION, model_name
from stages._tracking import check_reachable, store_errors, tracking_failure, tracking_uri
from vqprior.config import load_params
from vqprior.errors import VqpriorError


class NotPromoted(VqpriorError):
    """The version stays where it is; the message says why."""


def decide(candidate: dict, champion: dict | None) -> str | None:
    """Why `candidate` (tags of a model version) may not take the alias from `champion`, or None when it may."""
    if champion is None:
        return None
    if candidate["protocol"] != champion["protocol"]:
        return (f"it was scored under protocol {candidate['protocol']} and the champion under {champion['protocol']}: "
                f"FIDs of different protocols do not compare ({_protocol_difference(candidate, champion)})")
    if float(candidate["fid"]) >= float(champion["fid"]):
        return f"its FID {float(candidate['fid']):.3f} is not below the champion's {float(champion['fid']):.3f}"
    return None


def _protocol_difference(a: dict, b: dict) -> str:
    pa, pb = json.loads(a["protocol.json"]), json.loads(b["protocol.json"])
    return ", ".join(f"{k}: {pa.get(k)} vs {pb.get(k)}" for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k))


def promote(name: str, alias: str, version: str | None) -> str:
    """Move `alias` of `name` to `version` (None: the latest) if it beats the alias's version; the line to print."""
    from mlflow import MlflowClient

    client = MlflowClient()
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
    if not versions:
        raise NotPromoted(f"no version of {name} in {tracking_uri()}: `dvc repro evaluate` registers one")
    version = version or max(versions, key=int)
    if version not in versions:
        raise NotPromoted(f"{name} has no version {version} (it has {', '.join(sorted(versions, key=int))})")
    current = client.get_registered_model(name).aliases.get(alias)
    current = None if current is None else str(current)
    if current == version:
        return f"{name} version {version} is already {alias}"
    champion = versions[current].tags if current in versions else None
    if why := decide(versions[version].tags, champion):
        raise NotPromoted(f"{name} version {version} not promoted to {alias}: {why} (version {current} stays {alias})")
    client.set_registered_model_alias(name, alias, version)
    fid = float(versions[version].tags["fid"])
    before = f"was version {current}, FID {float(champion['fid']):.3f}" if champion else "the first"
    return f"{name} version {version} (FID {fid:.3f}) is now {alias} ({before})"


@speaks
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", help="the model version to promote (default: the latest)")
    parser.add_argument("--alias", default=CHAMPION, help=f"the alias to move (default: {CHAMPION})")
    args = parser.parse_args()
    import mlflow

    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    name = model_name(load_params().tracking.experiment)
    try:
        print(promote(name, args.alias, args.version))
    except store_errors() as exc:
        raise tracking_failure(exc, uri) from None


if __name__ == "__main__":
    main()
