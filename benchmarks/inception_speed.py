"""Inception (TF 2015-12-05) feature extraction speed: torch-fidelity's plain fp32 path vs the fast paths, and
what each does to FID, side by side in one run on the same real images.

    python benchmarks/inception_speed.py              # first 500 train vs first 500 test Fashion-MNIST images
    python benchmarks/inception_speed.py -n 200       # quicker

FID is train-vs-test (a real data floor), so a path is acceptable only if its FID is within 1% of plain fp32.
Images come from data/prepared if `prepare` has run, else from the Debian Fashion-MNIST IDX files.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vqprior.data.sources import DEBIAN_FASHION_MNIST, load_idx_dataset
from vqprior.features import read_uint8_images
from vqprior.extractors import INCEPTION
from vqprior.metrics import extract_features, metrics_from_features
PATHS = {  # name: extractor kwargs
    "plain fp32 (torch-fidelity: contiguous, fp32)": dict(inception_channels_last=False, inception_bf16=False),
    "channels-last fp32": dict(inception_channels_last=True, inception_bf16=False),
    "channels-last bf16 weights": dict(inception_channels_last=True, inception_bf16=True),
}


def load(split: str, n: int) -> torch.Tensor:
    """The first n images of a split as uint8 N x C x H x W: the prepared split if it exists, else the raw IDX files."""
    prepared = Path(f"data/prepared/{split}.parquet")
    if prepared.exists():
        return read_uint8_images(prepared, limit=n)
    images = load_idx_dataset(DEBIAN_FASHION_MNIST)[split].images[:n]  # N x H x W x 1
    return torch.from_numpy(images.copy()).permute(0, 3, 1, 2).contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=500, help="images per set (train and test)")
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--only", nargs="*", type=int, help="indices of PATHS to run (default: all)")
    args = ap.parse_args()
    train, test = load("train", args.n), load("test", args.n)
    print(f"{len(train)} train vs {len(test)} test images, batch {args.batch_size}, {torch.get_num_threads()} threads")
    rows, base = [], None
    for i, (name, kw) in enumerate(PATHS.items()):
        if args.only and i not in args.only:
            continue
        extract_features(train[:args.batch_size], batch_size=args.batch_size, **kw)  # warm-up: oneDNN kernel choice
        t0 = time.perf_counter()
        fa = extract_features(train, extractor=INCEPTION, batch_size=args.batch_size, **kw)
        fb = extract_features(test, extractor=INCEPTION, batch_size=args.batch_size, **kw)
        ips = (len(train) + len(test)) / (time.perf_counter() - t0)
        fid = metrics_from_features(fa, fb)["fid"]
        base = fid if base is None else base
        rows.append((name, ips, fid, (fid - base) / base))
        print(f"  {name}: {ips:.1f} images/s, FID {fid:.4f}", flush=True)
    print(f"\n{'path':<48} {'images/s':>9} {'speed-up':>9} {'FID':>10} {'rel. diff':>10}")
    for name, ips, fid, rel in rows:
        print(f"{name:<48} {ips:>9.1f} {ips / rows[0][1]:>8.2f}x {fid:>10.4f} {rel:>+10.2%}")


if __name__ == "__main__":
    main()
