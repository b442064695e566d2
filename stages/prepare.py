"""prepare: a data source (IDX, CIFAR-10, STL-10 or a folder of image files) -> cleaned train/val/test Parquet splits,
stats.json, a cleaning report (reports/prepare.json: drops by reason with example names, split sizes, class balance)
and the manifest it is counted from (reports/prepare_manifest.parquet: one row per file or image seen).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stages._cli import speaks
from stages._tracking import tracked_run
from stages import _paths as paths
from vqprior.config import Params, load_params
from vqprior.data.build import Deduplicator, array_images, pixel_facts, plan, write_splits
from vqprior.data.clean import CleanReport
from vqprior.data.folder import DecodeSpec, decode_files, entry_facts, scan_folder
from vqprior.data.images import Normalisation, iter_image_batches, open_parquet
from vqprior.data.sources import ARRAY_SOURCES, DataError, locate
from vqprior.io import file_hash, write_json_atomic
from vqprior.grids import save_grid

MANIFEST = Path("reports/prepare_manifest.parquet")  # one row per entry seen: `pd.read_parquet(MANIFEST).query(...)`


def example_images(path: Path, seed: int, n: int = 64, batch_size: int = 8192) -> np.ndarray:
    """n random images of a prepared split, streamed batch by batch: memory stays flat on large folders."""
    rows = open_parquet(path, "prepare").metadata.num_rows
    pick = np.sort(np.random.default_rng(seed).choice(rows, size=min(n, rows), replace=False))
    found, start = [], 0
    for images, _, _ in iter_image_batches(path, batch_size):
        found.append(images[pick[(pick >= start) & (pick < start + len(images))] - start])
        start += len(images)
    return np.concatenate(found)


@speaks
def main() -> None:
    p = load_params()
    cfg = p.prepare
    with tracked_run("prepare", p) as run:
        rng = np.random.default_rng(p.seed)
        report = CleanReport()
        dedupe = Deduplicator(cfg.near_duplicate_bits) if cfg.drop_duplicates else None
        split_args = dict(val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                          max_train=cfg.max_train, max_test=cfg.max_test)
        if p.data.source == "image_folder":
            origin, jobs, spec, images, classes = from_folder(p, rng, report, split_args)
            facts = lambda name, pixels: entry_facts(Path(origin) / name)  # noqa: E731
        else:
            origin, jobs, spec, images, classes = from_arrays(p, rng, report, split_args)
            facts = pixel_facts
        print(f"prepare: {len(jobs)} images from {p.data.source} ({origin}) -> {spec.size}x{spec.size}x{spec.channels}")
        writers = write_splits(jobs, images, spec, paths.PREPARED, report, dedupe, facts=facts)
        summary = report.as_dict()  # counted from the manifest: every entry seen is kept or dropped for a reason
        hashes = {s: file_hash(paths.PREPARED / f"{s}.parquet") for s in writers}
        pixel_stats = writers["train"].channel_stats()
        stats = {
            "source": p.data.source,
            "source_folder": origin,
            "classes": classes,
            "image_shape": [spec.size, spec.size, spec.channels],  # H, W, C
            "counts": summary["split_sizes"],
            "train_pixel_stats": pixel_stats,  # per channel, in [0, 1] units
            "normalisation": Normalisation.from_train_stats(cfg.normalisation, pixel_stats).as_dict(),
            "sha256": hashes,
        }
        write_json_atomic(paths.PREPARED / "stats.json", stats)
        write_json_atomic(paths.REPORTS["prepare"].detail, summary)
        report.write_manifest(MANIFEST)
        save_grid(torch.from_numpy(example_images(paths.PREPARED / "train.parquet", p.seed)).permute(0, 3, 1, 2),
                  "reports/prepare_examples.png", nrow=8)

        metrics = {f"{k}_images": v for k, v in summary["split_sizes"].items()} | {"dropped_total": summary["dropped_total"]}
        print(f"prepare: splits {summary['split_sizes']}, dropped {summary['dropped_total']} ({summary['dropped']})")
        run.log_metrics(metrics)
        for name in writers:
            run.log_dataset(paths.PREPARED / f"{name}.parquet", name=f"{p.data.source}_{name}", context=name,
                            digest=hashes[name])
        run.log_artifact(paths.REPORTS["prepare"].detail)
        run.log_artifact(MANIFEST)
        run.log_artifact("reports/prepare_examples.png")
        run.set_tags({"data.sha256." + k: v[:16] for k, v in hashes.items()})


def from_arrays(p: Params, rng, report: CleanReport, split_args: dict):
    folder = locate(p.data.source, p.data.root, p.data.download, paths.RAW)
    raw = ARRAY_SOURCES[p.data.source].load(folder)  # {"train", "test"}: RawSplit
    h, w, c = raw["train"].images.shape[1:]
    spec = DecodeSpec(size=p.data.image_size or min(h, w), channels=p.data.channels or c)
    report.counts_in = {s: len(r.images) for s, r in raw.items()}
    pools = {s: [(f"{s}/{i}", int(label)) for i, label in enumerate(r.labels)] for s, r in raw.items()}
    jobs = plan(pools, rng, **split_args)
    classes = [str(i) for i in range(int(max(r.labels.max() for r in raw.values())) + 1)]
    report.classes = classes
    return str(folder), jobs, spec, array_images(jobs, raw, spec), classes


def from_folder(p: Params, rng, report: CleanReport, split_args: dict):
    root = Path(p.data.root)
    if not root.is_dir():
        raise DataError(f"image folder {root} (data.root) not found; point data.root at a folder of images")
    scan = scan_folder(root)
    report.classes = scan.classes
    for rel, reason in scan.rejected:
        report.record(rel, None, reason, **entry_facts(root / rel, content=False))
    report.counts_in = {s: len(f) for s, f in scan.files.items()}
    jobs = plan(scan.files, rng, **split_args)
    spec = DecodeSpec(size=p.data.image_size, channels=p.data.channels or 3, min_size=p.prepare.min_size,
                      max_aspect=p.prepare.max_aspect)
    decoded = ((pixels, reason) for _, pixels, reason in
               decode_files(root, [j.name for j in jobs], spec, workers=p.prepare.workers, desc="prepare"))
    return str(root), jobs, spec, decoded, scan.classes


if __name__ == "__main__":
    main()
