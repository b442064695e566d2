"""evaluate: FID, KID, precision and recall of the samples against the cached test features (torch-fidelity, TF
Inception). Only the samples go through Inception; the real set's features come from the `reference` stage, and the
data floor (`reference`) and the VQ-VAE ceiling (`reconstruction_fid`) are copied beside the result for scale."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch_fidelity

from stages._tracking import tracked_run
from vqprior.config import load_params
from vqprior.features import load_features, score
from vqprior.io import write_json_atomic
from vqprior.metrics import INCEPTION, feature_layer
from vqprior.runtime import resolve_runtime


def read_metric(path: str, key: str, stage: str) -> float:
    if not Path(path).exists():
        raise SystemExit(f"error: {path} not found; run `dvc repro {stage}` first")
    return json.loads(Path(path).read_text())[key]


def main() -> None:
    p = load_params()
    cfg = p.evaluate
    runtime = resolve_runtime(p.compute)
    with tracked_run("evaluate", p) as run:
        samples_path = Path("data/samples/images.npy")
        if not samples_path.exists():
            raise SystemExit(f"error: {samples_path} not found; run `dvc repro sample` first")
        generated = torch.from_numpy(np.load(samples_path))
        reference = load_features()
        print(f"evaluate: {len(generated)} samples vs {len(reference)} test images (cached features), {INCEPTION}")
        metrics = score(generated, reference, batch_size=cfg.batch_size, prc_neighborhood=cfg.prc_neighborhood,
                        device=str(runtime.device), bf16=cfg.inception_bf16)
        metrics.update({
            "feature_extractor": INCEPTION, "feature_layer": feature_layer(INCEPTION),
            "floor_fid": read_metric("metrics/reference.json", "floor_fid", "reference"),
            "rfid": read_metric("metrics/reconstruction.json", "rfid", "reconstruction_fid"),
            "reference_split": "test", "reference_images": f"first {len(reference)} of the prepared test split",
            "resize": "bilinear to 299x299, TF1-compatible (torch-fidelity)", "prc_neighborhood": cfg.prc_neighborhood,
            "inception_precision": "bf16" if cfg.inception_bf16 else "fp32",
            "torch_fidelity_version": torch_fidelity.__version__,
        })
        write_json_atomic("metrics/evaluate.json", metrics)
        run.log_metrics(metrics)
        run.log_artifact("metrics/evaluate.json")
        print(f"evaluate: FID {metrics['fid']:.2f} (floor {metrics['floor_fid']:.2f}, rFID {metrics['rfid']:.2f}), "
              f"precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f} ({metrics['seconds']:.0f}s, "
              f"{metrics['images_per_second']:.1f} images/s)")


if __name__ == "__main__":
    main()
