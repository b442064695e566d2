"""extract_codes: encode every image of every split into the Parquet code store, streaming in batches.

With `extract_codes.hflip`, each train image is also encoded flipped left-right (a row tagged "hflip"):
the encoder is not flip-equivariant, so flipping the image, not the code grid, gives the flipped image's codes.
"""
from __future__ import annotations

import resource
import time

import torch
from tqdm import tqdm

from stages._cli import speaks
from stages._tracking import tracked_run
from stages import _paths as paths
from vqprior.codes import CodeWriter
from vqprior.config import load_params
from vqprior.data.images import iter_image_batches, load_stats
from vqprior.errors import InputError
from vqprior.io import atomic_group, file_hash, write_report
from vqprior.models.vqvae import load_vqvae
from vqprior.runtime import resolve_runtime

SPLITS = ("train", "val", "test")


@speaks
def main() -> None:
    p = load_params()
    runtime = resolve_runtime(p.compute)
    with tracked_run("extract_codes", p) as run:
        model, state = load_vqvae(paths.VQVAE, runtime.device)
        h, w, _ = state["image_shape"]
        gh, gw = model.grid_size(h, w)
        stats = load_stats(paths.PREPARED, needs=("image_shape", "counts", "sha256"))
        if list(stats["image_shape"]) != list(state["image_shape"]):
            raise InputError(paths.VQVAE, "train_vqvae", f"was trained on {state['image_shape']} (H, W, C) "
                             f"images but {paths.PREPARED} holds {stats['image_shape']}")
        meta = {
            "grid_height": gh, "grid_width": gw, "codebook_size": model.config.codebook_size, "image_shape": state["image_shape"],
            "vqvae_sha256": file_hash(paths.VQVAE), "data_sha256": stats["sha256"],
        }
        t0, total, rows = time.perf_counter(), sum(stats["counts"].values()), 0
        # the three splits appear together or not at all: never codes of two models side by side
        with tqdm(total=total, desc="extract_codes", unit="img", disable=None) as bar, atomic_group():
            for split in SPLITS:
                tags = ["none", "hflip"] if p.extract_codes.hflip and split == "train" else ["none"]
                with CodeWriter(paths.CODES / f"{split}.parquet", split, {**meta, "augmentations": tags}) as writer:
                    for images, labels, index in iter_image_batches(paths.PREPARED / f"{split}.parquet", p.extract_codes.batch_size):
                        x = model.normalisation.to_model(images).to(runtime.device)
                        for tag in tags:
                            with torch.no_grad(), runtime.autocast():
                                codes = model.encode(x.flip(-1) if tag == "hflip" else x)
                            writer.write(codes.cpu().numpy(), labels, index, augmentation=tag)
                        bar.update(len(images))
                rows += writer.rows
        seconds = time.perf_counter() - t0
        metrics = {
            "images": total, "rows": rows, "seconds": round(seconds, 2), "images_per_second": round(total / seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
            "grid_height": gh, "grid_width": gw, "codebook_size": meta["codebook_size"],
        }
        write_report(*paths.REPORTS["extract_codes"], metrics)
        run.log_metrics(metrics)
        flips = f" (+{rows - total} flipped train rows)" if rows > total else ""
        print(f"extract_codes: {total} images{flips} in {seconds:.1f}s ({metrics['images_per_second']:.0f} img/s), grid {gh}x{gw}")


if __name__ == "__main__":
    main()
