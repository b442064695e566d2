"""prepare: Fashion-MNIST IDX -> validated, de-duplicated train/val/test Parquet splits, stats.json, a cleaning report."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stages._tracking import tracked_run
from vqprior.config import load_params
from vqprior.data.clean import CleanReport, carve_val, drop_duplicates, subset
from vqprior.data.images import channel_stats, file_sha256, write_images
from vqprior.data.sources import load_fashion_mnist, locate_fashion_mnist
from vqprior.io import write_json_atomic
from vqprior.plots import save_grid

OUT = Path("data/prepared")


def main() -> None:
    p = load_params()
    with tracked_run("prepare", p) as run:
        folder = locate_fashion_mnist(p.data.root, p.data.download, Path("data/raw"))
        print(f"prepare: reading Fashion-MNIST from {folder}")
        raw = load_fashion_mnist(folder)
        report = CleanReport(counts_in={name: len(split.images) for name, split in raw.items()})
        if p.prepare.drop_duplicates:
            raw = drop_duplicates(raw, ["train", "test"], report)
        rng = np.random.default_rng(p.seed)
        train = subset(raw["train"], p.prepare.max_train, rng)
        test = subset(raw["test"], p.prepare.max_test, rng)
        train, val = carve_val(train, p.prepare.val_fraction, rng)
        splits = {"train": train, "val": val, "test": test}

        for name, split in splits.items():
            write_images(OUT / f"{name}.parquet", split.images, split.labels)
            report.split_sizes[name] = len(split.images)
            report.class_balance[name] = {int(k): int(v) for k, v in zip(*np.unique(split.labels, return_counts=True))}
        hashes = {name: file_sha256(OUT / f"{name}.parquet") for name in splits}
        stats = {
            "source": "fashion_mnist",
            "source_folder": str(folder),
            "image_shape": list(train.images.shape[1:]),  # H, W, C
            "counts": report.split_sizes,
            "train_pixel_stats": channel_stats(train.images),  # per channel, in [0, 1] units
            # stored pixels are uint8; models see x / 127.5 - 1, so decoding is (y + 1) * 127.5
            "normalisation": {"kind": "scale", "scale": 1 / 127.5, "shift": -1.0, "range": [-1.0, 1.0]},
            "sha256": hashes,
        }
        write_json_atomic(OUT / "stats.json", stats)
        write_json_atomic("reports/prepare.json", report.as_dict())
        pick = np.random.default_rng(p.seed).choice(len(train.images), size=min(64, len(train.images)), replace=False)
        save_grid(torch.from_numpy(train.images[pick]).permute(0, 3, 1, 2), "reports/prepare_examples.png", nrow=8)

        summary = report.as_dict()
        metrics = {f"{k}_images": v for k, v in report.split_sizes.items()} | {"dropped_total": summary["dropped_total"]}
        write_json_atomic("metrics/prepare.json", metrics)
        print(f"prepare: splits {report.split_sizes}, dropped {summary['dropped_total']} ({summary['dropped']})")
        run.log_metrics(metrics)
        for name in splits:
            run.log_dataset(OUT / f"{name}.parquet", name=f"fashion_mnist_{name}", context=name, digest=hashes[name])
        run.log_artifact("reports/prepare.json")
        run.log_artifact("reports/prepare_examples.png")
        run.set_tags({"data.sha256." + k: v[:16] for k, v in hashes.items()})


if __name__ == "__main__":
    main()
