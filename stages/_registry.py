"""The model registry: each `evaluate` run registers the generator it scored (VQ-VAE + prior) as a new version of
the registered model `<experiment>-generator`, and `python -m stages.promote` moves the `champion` alias to a version
only when it beats the champion's FID under the same evaluation protocol. Aliases, not MLflow's deprecated stages.

A version holds the two model files (artifacts of the evaluate run, under `generator/`) and, as tags, their DVC
hashes, the git commit, FID / precision / recall and the protocol they were measured under: FIDs measured against
other reference images, another feature space or another number of samples are not comparable, so `promote` refuses
to rank them."""
from __future__ import annotations

import hashlib
import json

from stages import _paths as paths
from stages._tracking import StageRun, dvc_md5, git_commit

ARTIFACT_FOLDER = "generator"
CHAMPION = "champion"
SCORES = ("fid", "precision", "recall")
# what makes two FIDs comparable: the same feature space and layer, the same reference images, as many samples and
# reference images, the same k for precision and recall
PROTOCOL_KEYS = ("feature_extractor", "feature_layer", "resize", "reference_split", "num_samples", "num_reference",
                 "prc_neighborhood")


def model_name(experiment: str) -> str:
    return f"{experiment}-generator"


def protocol(metrics: dict) -> dict:
    """The evaluation protocol of `evaluate`'s metrics, with the DVC hash of the reference features (which fixes the
    reference images and the extractor's weights)."""
    return {k: metrics[k] for k in PROTOCOL_KEYS} | {"reference_features": dvc_md5(paths.TEST_FEATURES)}


def protocol_id(proto: dict) -> str:
    """A short name for a protocol: two versions with the same id were scored the same way."""
    return hashlib.sha256(json.dumps(proto, sort_keys=True).encode()).hexdigest()[:12]


def register_generator(run: StageRun, experiment: str, metrics: dict) -> str | None:
    """A new version of the generator model with `metrics`' scores; its number (None when tracking is off)."""
    for model in (paths.VQVAE, paths.PRIOR):
        run.log_artifact(model, ARTIFACT_FOLDER)
    proto = protocol(metrics)
    tags = {k: repr(float(metrics[k])) for k in SCORES} | {
        "protocol": protocol_id(proto), "protocol.json": json.dumps(proto, sort_keys=True),
        "git.commit": git_commit(),
        f"dvc.md5.{paths.VQVAE}": dvc_md5(paths.VQVAE), f"dvc.md5.{paths.PRIOR}": dvc_md5(paths.PRIOR),
    }
    description = (f"VQ-VAE ({paths.VQVAE}) + prior ({paths.PRIOR}); FID {metrics['fid']:.2f}, precision "
                   f"{metrics['precision']:.3f}, recall {metrics['recall']:.3f} under protocol {tags['protocol']}")
    return run.register_version(model_name(experiment), ARTIFACT_FOLDER, tags, description)
