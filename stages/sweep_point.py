"""sweep_point: sample at one (temperature, top_k, top_p, guidance) point of the sweep grid, score it like `evaluate`.

dvc.yaml expands this stage once per grid point (`matrix` over params.yaml's `sweep` lists), so DVC caches every
point on its own: adding a temperature runs only the new points. The other sampling settings (number of samples,
batch size) are the `sample` section's; an unconditional prior ignores guidance.
Writes <out>/images.npy, <out>/samples.png and <out>/scores.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from stages._cli import speaks
from stages._tracking import tracked_run
from stages import _paths as paths
from vqprior.config import load_params
from vqprior.features import score_samples
from vqprior.io import save_npy, write_json_atomic
from vqprior.grids import save_sample_grid
from vqprior.runtime import resolve_runtime
from vqprior.sampling import generate, load_generator


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--temperature", type=float, required=True)
    parser.add_argument("--top-k", type=int, required=True)
    parser.add_argument("--top-p", type=float, required=True)
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance (conditional priors)")
    parser.add_argument("--out", type=Path, required=True, help="folder for this point's samples and scores")
    args = parser.parse_args(argv)
    if args.temperature <= 0 or args.top_k < 0 or not 0 < args.top_p <= 1 or args.guidance < 0:
        parser.error(f"need temperature > 0, top_k >= 0, 0 < top_p <= 1, guidance >= 0; got {args.temperature}, "
                     f"{args.top_k}, {args.top_p}, {args.guidance}")
    return args


@speaks
def main(argv=None) -> None:
    args = parse_args(argv)
    p = load_params()
    cfg = p.sample
    runtime = resolve_runtime(p.compute)
    point = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "guidance": args.guidance}
    with tracked_run("sweep_point", p) as run:
        run.set_tags({f"sweep.{k}": v for k, v in point.items()})
        run.log_metrics(point)
        prior, prior_state, vqvae = load_generator(paths.PRIOR, paths.VQVAE, runtime.device)
        out = generate(prior, vqvae, tuple(prior_state["grid"]), runtime, num_samples=cfg.num_samples,
                       batch_size=cfg.batch_size, seed=p.seed, **point)
        save_npy(args.out / "images.npy", out.images.numpy())
        save_sample_grid(out.images, prior.num_classes, args.out / "samples.png")
        scores = score_samples(out.images, p.evaluate, str(runtime.device), reference_features=paths.TEST_FEATURES,
                               reference_images=paths.TEST_IMAGES)
        result = point | {"unique_codes_used": int(np.unique(out.codes.numpy()).size)} | scores
        write_json_atomic(args.out / "scores.json", result)
        run.log_metrics(result)
        run.log_artifact(args.out / "samples.png")
        print(f"sweep_point T={args.temperature} top_k={args.top_k} top_p={args.top_p} guidance={args.guidance}: "
              f"FID {result['fid']:.2f}, "
              f"precision {result['precision']:.3f}, recall {result['recall']:.3f}")


if __name__ == "__main__":
    main()
