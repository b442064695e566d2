"""extract_codes: encode every image of every split into the Parquet code store, streaming in batches."""
from __future__ import annotations

import resource
import time
from pathlib import Path

import torch
from tqdm import tqdm

from stages._tracking import tracked_run
from vqprior.codes import CodeWriter
from vqprior.config import load_params
from vqprior.data.images import file_sha256, iter_image_batches, load_stats, to_model_input
from vqprior.io import write_json_atomic
from vqprior.models.vqvae import load_vqvae
from vqprior.runtime import resolve_runtime

PREPARED, OUT = Path("data/prepared"), Path("data/codes")
SPLITS = ("train", "val", "test")


def main() -> None:
    p = load_params()
    runtime = resolve_runtime(p.compute)
    with tracked_run("extract_codes", p) as run:
        model, state = load_vqvae("models/vqvae.pt", runtime.device)
        h, w, _ = state["image_shape"]
        gh, gw = model.grid_size(h, w)
        stats = load_stats(PREPARED)
        meta = {
            "grid_height": gh, "grid_width": gw, "codebook_size": model.config.codebook_size, "image_shape": state["image_shape"],
            "vqvae_sha256": file_sha256("models/vqvae.pt"), "data_sha256": stats["sha256"],
        }
        t0, total = time.perf_counter(), sum(stats["counts"].values())
        with tqdm(total=total, desc="extract_codes", unit="img", disable=None) as bar:
            for split in SPLITS:
                with CodeWriter(OUT / f"{split}.parquet", split, meta) as writer:
                    for images, labels, index in iter_image_batches(PREPARED / f"{split}.parquet", p.extract_codes.batch_size):
                        with torch.no_grad(), runtime.autocast():
                            codes = model.encode(to_model_input(images).to(runtime.device))
                        writer.write(codes.cpu().numpy(), labels, index)
                        bar.update(len(images))
        seconds = time.perf_counter() - t0
        metrics = {
            "images": total, "seconds": round(seconds, 2), "images_per_second": round(total / seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
            "grid_height": gh, "grid_width": gw, "codebook_size": meta["codebook_size"],
        }
        write_json_atomic("metrics/extract_codes.json", metrics)
        run.log_metrics(metrics)
        print(f"extract_codes: {total} images in {seconds:.1f}s ({metrics['images_per_second']:.0f} img/s), grid {gh}x{gw}")


if __name__ == "__main__":
    main()
