"""prepare on a folder of image files: images/s and peak memory, decoding on 1 process vs all cores, side by side.

    python benchmarks/prepare_folder.py                 # 20,000 generated JPEGs (varied sizes, 10 class folders)
    python benchmarks/prepare_folder.py -n 2000 --size 32

The folder is generated once under --folder (kept for re-runs). Each configuration runs in a fresh process (so its peak
RSS is its own) through the same code `prepare` uses: scan, decode + clean on N workers, stream into Parquet.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def generate(folder: Path, n: int, seed: int = 0) -> None:
    """n JPEGs of 64..400 pixels a side (smooth random colour fields, so JPEG works as on photos) in 10 classes."""
    done = folder / ".complete"
    if done.exists() and int(done.read_text()) == n:
        return
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = rng.integers(64, 401, size=2)
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((int(w), int(h)), Image.Resampling.BICUBIC)
        path = folder / f"class_{i % 10}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
    done.write_text(str(n))


def run_once(folder: str, size: int, workers: int) -> dict:
    """In this process: the prepare path on the folder; prints one JSON line."""
    from vqprior.data.build import Deduplicator, plan, write_splits
    from vqprior.data.clean import CleanReport
    from vqprior.data.folder import DecodeSpec, decode_files, scan_folder

    t0 = time.perf_counter()
    scan = scan_folder(folder)
    jobs = plan(scan.files, np.random.default_rng(0), val_fraction=0.1, test_fraction=0.1)
    spec = DecodeSpec(size=size, channels=3, min_size=16, max_aspect=4.0)
    report = CleanReport()
    with tempfile.TemporaryDirectory() as out:
        decoded = ((px, r) for _, px, r in decode_files(folder, [j.name for j in jobs], spec, workers=workers))
        writers = write_splits(jobs, decoded, spec, Path(out), report, Deduplicator(near_bits=4))
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest decoding worker
    return {"workers": workers, "images": len(jobs), "kept": sum(w.count for w in writers.values()),
            "seconds": round(seconds, 1), "images_per_second": round(len(jobs) / seconds, 1),
            "peak_rss_mb": round(peak_mb), "worker_peak_rss_mb": round(children_mb)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20000, help="JPEGs to generate (default 20,000)")
    ap.add_argument("--size", type=int, default=64, help="prepared image side (default 64)")
    ap.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "vqprior-bench-jpegs")
    ap.add_argument("--once", nargs=2, metavar=("FOLDER", "WORKERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.once:
        print(json.dumps(run_once(args.once[0], args.size, int(args.once[1]))))
        return
    folder = args.folder / str(args.n)
    print(f"generating {args.n} JPEGs in {folder} (once)...", flush=True)
    generate(folder, args.n)
    import os

    rows = []
    for workers in sorted({1, os.cpu_count() or 1}):
        out = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--once", str(folder), str(workers)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n{args.n} JPEGs (64..400 px) -> {args.size}x{args.size} RGB, exact + near-duplicate checks, streamed to Parquet")
    print(f"{'workers':>7} {'images/s':>9} {'seconds':>8} {'peak RSS MB':>12} {'worker RSS MB':>14}")
    for r in rows:
        print(f"{r['workers']:>7} {r['images_per_second']:>9} {r['seconds']:>8} {r['peak_rss_mb']:>12} {r['worker_peak_rss_mb']:>14}")
    if len(rows) == 2:
        print(f"all cores / 1 process: {rows[1]['images_per_second'] / rows[0]['images_per_second']:.2f}x")


if __name__ == "__main__":
    main()
