"""Predict a run's time on this machine before starting it: every heavy part's speed, fp32 beside the fastest path
this CPU (or GPU) has, and the minutes each stage would take with a params file.

    python benchmarks/run_time.py                          # params.yaml, on this machine as it is
    python benchmarks/run_time.py --params profiles/full.yaml
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/run_time.py   # an AVX2-only CPU's floor

Parts measured at the params' own sizes and batches: VQ-VAE training (images/s), encoding (images/s), prior training
(tokens/s), KV-cache sampling with the params' guidance (samples/s), TF Inception (images/s, what FID costs) and
the classifier's training (images/s). The fastest path is what `precision: auto` picks (bf16 only where native);
predictions use it. Data sizes are Fashion-MNIST's (or `prepare`'s counts if it has run); the light stages
(prepare, analyse_prior, sweep) are not measured and appear as one small allowance.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import autocast, timed, train_step  # noqa: E402  (same step and timer as the training benchmark)

from vqprior.config import load_params  # noqa: E402
from vqprior.extractors import INCEPTION  # noqa: E402
from vqprior.metrics import extract_features  # noqa: E402
from vqprior.models.classifier import Classifier  # noqa: E402
from vqprior.models.prior import Prior  # noqa: E402
from vqprior.models.vqvae import VQVAE  # noqa: E402
from vqprior.runtime import resolve_precision  # noqa: E402
from vqprior.sampling import sample_codes  # noqa: E402

LIGHT_MINUTES = 3.0  # prepare, analyse_prior, sweep table and DVC/MLflow start-up, measured together on 2 cores


def counts() -> dict:
    stats = Path("metrics/prepare.json")
    if stats.exists():
        s = json.loads(stats.read_text())
        return {k: s[f"{k}_images"] for k in ("train", "val", "test")}
    return {"train": 54000, "val": 6000, "test": 10000}  # Fashion-MNIST with val_fraction 0.1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def speeds(p, precision: str, steps: int) -> dict:
    """images/s, tokens/s or samples/s of each part in `precision`."""
    out = {}
    vq = VQVAE(p.train_vqvae.model)
    b = p.train_vqvae.train.batch_size
    x = torch.rand(b, 1, 28, 28) * 2 - 1
    out["vqvae_train"] = b / timed(train_step(vq, lambda m: m.loss(x)[0], precision), steps)
    vq.eval()
    xe = torch.rand(p.extract_codes.batch_size, 1, 28, 28) * 2 - 1
    with torch.no_grad(), autocast(precision):
        out["encode"] = len(xe) / timed(lambda: vq.encode(xe), max(2, steps // 4))
    gh, gw = vq.grid_size(28, 28)
    length, vocab = gh * gw, p.train_vqvae.model.codebook_size
    prior = Prior(p.train_prior.model, vocab=vocab, length=length)
    pb = p.train_prior.train.batch_size
    codes = torch.randint(0, vocab, (pb, length))
    labels = torch.randint(0, 10, (pb,)) if p.train_prior.model.num_classes else None
    out["prior_train"] = pb * length / timed(
        train_step(prior, lambda m: m.loss(codes, labels)[0], precision, p.train_prior.train), steps)
    prior.eval()
    n = p.sample.batch_size
    sample_labels = torch.arange(n) % p.train_prior.model.num_classes if p.train_prior.model.num_classes else None
    with torch.no_grad(), autocast(precision):
        out["sample"] = n / timed(lambda: sample_codes(prior, n, labels=sample_labels, guidance=p.sample.guidance), 1)
    clf = Classifier(p.train_classifier.model, in_channels=1, num_classes=10)
    cb = p.train_classifier.train.batch_size
    xc, yc = torch.rand(cb, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (cb,))
    out["classifier_train"] = cb / timed(train_step(clf, lambda m: m.loss(xc, yc)[0], precision), steps)
    images = torch.randint(0, 256, (max(4 * p.evaluate.batch_size, 40), 1, 28, 28), dtype=torch.uint8)
    bf16 = precision == "bf16"
    extract_features(images[: p.evaluate.batch_size], extractor=INCEPTION, batch_size=p.evaluate.batch_size,
                     inception_bf16=bf16)  # warm-up: oneDNN kernel choice and the one-off freeze
    t0 = time.perf_counter()
    extract_features(images, extractor=INCEPTION, batch_size=p.evaluate.batch_size, inception_bf16=bf16)
    out["inception"] = len(images) / (time.perf_counter() - t0)
    return out


def inception_images(p) -> dict:
    """Images each stage pushes through Inception in one full run of these params."""
    n, s = p.evaluate.num_reference, p.sample.num_samples
    sweep_points = math.prod(len(v) for v in (p.sweep.temperature, p.sweep.top_k, p.sweep.top_p, p.sweep.guidance))
    return {"reference": 2 * n, "reconstruction_fid": 2 * n, "evaluate": p.sample.seeds * s, "sweep": sweep_points * s}


def predict(p, rate: dict, n: dict) -> dict:
    """Minutes per stage from the measured speeds (the training stages' validation passes included)."""
    vq_epochs, pr_epochs = p.train_vqvae.train.epochs, p.train_prior.train.epochs
    grid = VQVAE(p.train_vqvae.model).grid_size(28, 28)
    length = grid[0] * grid[1]
    inc = inception_images(p)
    sweep_points = inc["sweep"] // max(p.sample.num_samples, 1)
    seconds = {
        "train_classifier": p.train_classifier.train.epochs * n["train"] / rate["classifier_train"],
        # an epoch's validation encodes and decodes the val split: about 2 encodes' work
        "train_vqvae": vq_epochs * (n["train"] / rate["vqvae_train"] + 2 * n["val"] / rate["encode"]),
        "extract_codes": sum(n.values()) / rate["encode"],
        # validation is a forward pass: about a third of a training step's work per token
        "train_prior": pr_epochs * (n["train"] + n["val"] / 3) * length / rate["prior_train"],
        "sample": p.sample.seeds * p.sample.num_samples / rate["sample"],
        "reference": inc["reference"] / rate["inception"],
        "reconstruction_fid": inc["reconstruction_fid"] / rate["inception"],
        "evaluate": inc["evaluate"] / rate["inception"],
        "sweep": inc["sweep"] / rate["inception"] + sweep_points * p.sample.num_samples / rate["sample"],
    }
    return {k: v / 60 for k, v in seconds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per part")
    args = ap.parse_args()
    p = load_params(args.params)
    torch.manual_seed(0)
    fastest = resolve_precision("auto", torch.device("cpu"))
    precisions = ["fp32"] + (["bf16"] if fastest == "bf16" else [])
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          + (f", kernels capped at ONEDNN_MAX_CPU_ISA={cap}" if cap else "") + f"; params {args.params}")
    rates = {precision: speeds(p, precision, args.steps) for precision in precisions}
    units = {"vqvae_train": "images/s", "encode": "images/s", "prior_train": "tokens/s", "sample": "samples/s",
             "classifier_train": "images/s", "inception": "images/s"}
    print(f"\n{'part':<18} {'fp32':>10} {fastest if fastest != 'fp32' else '':>10} {'ratio':>7}  unit")
    for part, unit in units.items():
        fp32 = rates["fp32"][part]
        fast = rates[fastest][part]
        extra = f"{fast:>10.1f} {fast / fp32:>6.2f}x" if fastest != "fp32" else f"{'':>10} {'':>7}"
        print(f"{part:<18} {fp32:>10.1f} {extra}  {unit}")
    minutes = predict(p, rates[fastest], counts())
    inc = inception_images(p)
    print(f"\npredicted minutes per stage ({fastest}, the path `precision: auto` takes here):")
    for stage, m in minutes.items():
        note = f"  ({inc[stage]:,} Inception images)" if stage in inc else ""
        print(f"  {stage:<20} {m:6.1f}{note}")
    total = sum(minutes.values()) + LIGHT_MINUTES
    print(f"  {'light stages':<20} {LIGHT_MINUTES:6.1f}\n  {'total':<20} {total:6.1f}  "
          f"({sum(inc.values()):,} Inception images; install not included)")


if __name__ == "__main__":
    main()
