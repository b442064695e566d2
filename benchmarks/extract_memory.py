"""Peak memory of `extract_codes` on the full prepared data set vs a 10x smaller copy, side by side.

    dvc repro train_vqvae && python benchmarks/extract_memory.py

Runs the real stage (`python -m stages.extract_codes`) twice in temporary copies of the project: once on
data/prepared as it is, once on the first tenth of every split. The code store is written in row groups as
batches come, so peak memory should not grow with the data set.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vqprior.data.images import read_images, write_images

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")


def project_copy(dest: Path, fraction: int) -> Path:
    """params, dvc.yaml, the stages and the VQ-VAE; data/prepared with the first 1/fraction of each split."""
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "stages", dest / "stages")
    (dest / "models").mkdir()
    os.symlink(ROOT / "models/vqvae.pt", dest / "models/vqvae.pt")
    prepared = dest / "data/prepared"
    prepared.mkdir(parents=True)
    stats = json.loads((ROOT / "data/prepared/stats.json").read_text())
    for split in SPLITS:
        full = read_images(ROOT / f"data/prepared/{split}.parquet")
        keep = len(full) // fraction
        write_images(prepared / f"{split}.parquet", full.images[:keep], full.labels[:keep])
        stats["counts"][split] = keep
    (prepared / "stats.json").write_text(json.dumps(stats))
    return dest


def extract(fraction: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        repo = project_copy(Path(tmp), fraction)
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{repo}", "MLFLOW_DISABLE_TELEMETRY": "true"}
        subprocess.run([sys.executable, "-m", "stages.extract_codes"], cwd=repo, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return {**json.loads((repo / "metrics/extract_codes.json").read_text()),  # time and memory
                **json.loads((repo / "reports/extract_codes_detail.json").read_text())}  # counts and speed


def main() -> None:
    for needed in ("data/prepared/stats.json", "models/vqvae.pt"):
        if not (ROOT / needed).exists():
            raise SystemExit(f"error: {needed} not found; run `dvc repro train_vqvae` first")
    rows = [("full", extract(1)), ("1/10", extract(10))]
    print(f"{'data':6s} {'images':>8s} {'seconds':>8s} {'images/s':>9s} {'peak RSS MB':>12s}")
    for name, m in rows:
        print(f"{name:6s} {m['images']:8d} {m['seconds']:8.2f} {m['images_per_second']:9.0f} {m['peak_rss_mb']:12.1f}")
    full, small = rows[0][1]["peak_rss_mb"], rows[1][1]["peak_rss_mb"]
    print(f"peak memory full / small: {full / small:.3f} (flat means within 1.10)")


if __name__ == "__main__":
    main()
