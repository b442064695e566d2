"""reference: Inception features of the real images, extracted once, and the data floor (train vs test).

The first `evaluate.num_reference` test images are the real set every FID of this pipeline compares against; the
first `evaluate.num_reference` train images give the floor: what a perfect model (one that reproduces the data
distribution) would score under the same protocol and sample count.
"""
from __future__ import annotations

from stages._cli import speaks
from stages._tracking import tracked_run
from stages import _paths as paths
from vqprior.config import load_params
from vqprior.extractors import INCEPTION
from vqprior.features import inception_bf16, read_labelled_images, save_features, timed_features
from vqprior.io import write_report
from vqprior.metrics import metrics_from_features, precision_recall_by_class
from vqprior.runtime import resolve_runtime


# metrics/reference.json: the floor under the names evaluate uses; everything in reports/reference_detail.json
HEADLINE = {"fid": "floor_fid", "precision": "floor_precision", "recall": "floor_recall"}


@speaks
def main() -> None:
    p = load_params()
    cfg = p.evaluate
    runtime = resolve_runtime(p.compute)
    with tracked_run("reference", p) as run:
        test, test_labels = read_labelled_images(paths.TEST_IMAGES, limit=cfg.num_reference)
        train, train_labels = read_labelled_images(paths.TRAIN_IMAGES, limit=cfg.num_reference)
        if min(len(test), len(train)) < cfg.num_reference:
            print(f"reference: only {len(test)} test / {len(train)} train images, fewer than "
                  f"evaluate.num_reference={cfg.num_reference}")
        print(f"reference: {INCEPTION} features of {len(test)} test and {len(train)} train images")
        kw = dict(batch_size=cfg.batch_size, device=str(runtime.device), bf16=inception_bf16(cfg, runtime.device))
        f_test, s_test = timed_features(test, **kw)
        f_train, s_train = timed_features(train, **kw)
        save_features(paths.TEST_FEATURES, f_test)
        save_features(paths.TRAIN_FEATURES, f_train)
        floor = metrics_from_features(f_train, f_test, prc_neighborhood=cfg.prc_neighborhood, kid=True)
        floor |= precision_recall_by_class(f_train, f_test, train_labels, test_labels,
                                           prc_neighborhood=cfg.prc_neighborhood)
        seconds = s_test + s_train
        metrics = {
            "floor_fid": floor["fid"], "floor_precision": floor["precision"], "floor_recall": floor["recall"],
            "floor_kid": floor["kid"], "floor_recall_by_class": floor["recall_by_class"],
            "floor_precision_by_class": floor["precision_by_class"], "num_reference": len(test), "num_train": len(train),
            "feature_extractor": INCEPTION, "feature_dim": int(f_test.shape[1]),
            "inception_precision": "bf16" if kw["bf16"] else "fp32", "inception_images": len(test) + len(train),
            "seconds": round(seconds, 1), "images_per_second": round((len(test) + len(train)) / seconds, 1),
        }
        write_report(*paths.REPORTS["reference"], metrics, HEADLINE)
        run.log_metrics(metrics)
        print(f"reference: floor (first {len(train)} train vs first {len(test)} test) FID {floor['fid']:.2f}, "
              f"precision {floor['precision']:.3f}, recall {floor['recall']:.3f} ({seconds:.0f}s, "
              f"{metrics['images_per_second']:.1f} images/s)")


if __name__ == "__main__":
    main()
