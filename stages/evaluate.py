"""evaluate: FID, precision and recall of the samples against the test images (torch-fidelity, TF Inception)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch_fidelity

from stages._tracking import tracked_run
from vqprior.config import load_params
from vqprior.data.images import read_images
from vqprior.io import write_json_atomic
from vqprior.metrics import INCEPTION, fidelity_metrics
from vqprior.runtime import resolve_runtime


def main() -> None:
    p = load_params()
    cfg = p.evaluate
    runtime = resolve_runtime(p.compute)
    with tracked_run("evaluate", p) as run:
        samples_path = Path("data/samples/images.npy")
        if not samples_path.exists():
            raise SystemExit(f"error: {samples_path} not found; run `dvc repro sample` first")
        generated = torch.from_numpy(np.load(samples_path))
        test = read_images("data/prepared/test.parquet", limit=cfg.num_reference)
        reference = torch.from_numpy(test.images.copy()).permute(0, 3, 1, 2).contiguous()  # Parquet buffers are read-only
        if len(reference) < cfg.num_reference:
            print(f"evaluate: only {len(reference)} test images, fewer than evaluate.num_reference={cfg.num_reference}")
        print(f"evaluate: {len(generated)} samples vs {len(reference)} test images, {INCEPTION} features")
        t0 = time.perf_counter()
        metrics = fidelity_metrics(generated, reference, extractor=INCEPTION, batch_size=cfg.batch_size,
                                   prc_neighborhood=cfg.prc_neighborhood, device=str(runtime.device), kid=True)
        seconds = time.perf_counter() - t0
        metrics.update({
            "reference_split": "test", "reference_images": f"first {len(reference)} of the prepared test split",
            "resize": "bilinear to 299x299, TF1-compatible (torch-fidelity)", "prc_neighborhood": cfg.prc_neighborhood,
            "torch_fidelity_version": torch_fidelity.__version__, "seconds": round(seconds, 1),
            "images_per_second": round((len(generated) + len(reference)) / seconds, 1),
        })
        write_json_atomic("metrics/evaluate.json", metrics)
        run.log_metrics(metrics)
        run.log_artifact("metrics/evaluate.json")
        print(f"evaluate: FID {metrics['fid']:.2f}, precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f} "
              f"({seconds:.0f}s)")


if __name__ == "__main__":
    main()
