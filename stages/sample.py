"""sample: draw code grids from the prior (temperature, top-k, top-p, KV cache) and decode them.

A class-conditional prior gets labels spread evenly over its classes (sample i is class i % num_classes)
and classifier-free guidance; the PNG grid then shows one row per class.
"""
from __future__ import annotations


import numpy as np

from stages._cli import speaks
from stages._tracking import tracked_run
from stages import _paths as paths
from vqprior.config import load_params
from vqprior.io import atomic_group, extra_sample_set, extra_sample_sets, save_npy, write_report
from vqprior.grids import save_sample_grid
from vqprior.runtime import resolve_runtime
from vqprior.sampling import generate, load_generator



@speaks
def main() -> None:
    p = load_params()
    cfg = p.sample
    runtime = resolve_runtime(p.compute)
    with tracked_run("sample", p) as run:
        prior, prior_state, vqvae = load_generator(paths.PRIOR, paths.VQVAE, runtime.device)

        def draw(seed: int):
            return generate(prior, vqvae, tuple(prior_state["grid"]), runtime, num_samples=cfg.num_samples,
                            batch_size=cfg.batch_size, seed=seed, guidance=cfg.guidance,
                            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)

        out = draw(p.seed)
        classes = prior.num_classes
        # more sets with the next seeds: only for `evaluate`'s spread, so a run's scores come with their sampling noise
        extra = {extra_sample_set(paths.SAMPLES, seed): draw(seed).images.numpy() for seed in range(p.seed + 1, p.seed + cfg.seeds)}
        with atomic_group():  # every set of this run appears at once, or none does: never sets of two runs side by side
            save_npy(paths.SAMPLES / "images.npy", out.images.numpy())  # N x C x H x W uint8
            save_npy(paths.SAMPLES / "codes.npy", out.codes.numpy().astype(np.uint16))
            if classes:
                save_npy(paths.SAMPLES / "labels.npy", out.labels.numpy())  # int64, one per sample
            for path, images in extra.items():
                save_npy(path, images)
        if not classes:
            (paths.SAMPLES / "labels.npy").unlink(missing_ok=True)  # none from an earlier conditional run
        for stale in set(extra_sample_sets(paths.SAMPLES)) - set(extra):  # sets of an earlier run with more seeds
            stale.unlink()
        save_sample_grid(out.images, classes, "reports/samples.png")
        metrics = {
            "num_samples": cfg.num_samples, "samples_per_second": round(cfg.num_samples / out.seconds, 1),
            "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
            "num_classes": classes, "guidance": cfg.guidance if classes else None,
            "unique_codes_used": int(np.unique(out.codes.numpy()).size), "seeds": cfg.seeds,
        }
        write_report(*paths.REPORTS["sample"], metrics)
        run.log_metrics(metrics)
        run.log_artifact("reports/samples.png")
        guided = f", {classes} classes, guidance {cfg.guidance}" if classes else ""
        print(f"sample: {cfg.num_samples} samples at {metrics['samples_per_second']:.0f}/s "
              f"(T={cfg.temperature}, top_k={cfg.top_k}, top_p={cfg.top_p}{guided})"
              + (f"; {cfg.seeds - 1} more sets with seeds {p.seed + 1}..{p.seed + cfg.seeds - 1}" if cfg.seeds > 1 else ""))


if __name__ == "__main__":
    main()
