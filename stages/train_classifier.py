"""train_classifier: a small CNN on the prepared labels; its feature layer is a second space for FID / precision / recall."""
from __future__ import annotations


import numpy as np
import torch

from stages._cli import speaks
from stages._tracking import tracked_run
from stages import _paths as paths
from vqprior import distributed
from vqprior.config import load_params
from vqprior.data.images import load_stats, read_images
from vqprior.errors import DataError
from vqprior.io import write_report
from vqprior.models import save_model
from vqprior.models.classifier import Classifier, scale_images
from vqprior.runtime import resolve_runtime, seed_everything
from vqprior.training import fingerprint, fit



def load_split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N x C x H x W (4x smaller than floats; scaled per batch) and int64 labels; unlabelled data stops here."""
    split = read_images(paths.PREPARED / f"{name}.parquet")
    if (missing := int((split.labels < 0).sum())):
        raise DataError(f"{missing} of {len(split)} images in {paths.PREPARED / name}.parquet have no label; "
                         "train_classifier needs a labelled data set")
    images = torch.from_numpy(np.require(split.images, requirements="W")).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(split.labels)


@torch.no_grad()
def evaluate(model: Classifier, x: torch.Tensor, y: torch.Tensor, runtime, batch_size: int = 1024) -> dict:
    """Mean cross-entropy and accuracy over the whole split (each rank scores its share)."""
    model.eval()
    loss = correct = 0.0
    part = distributed.share(len(x))
    x, y = x[part], y[part]
    for start in range(0, len(x), batch_size):
        xb, yb = scale_images(x[start : start + batch_size].to(runtime.device)), y[start : start + batch_size].to(runtime.device)
        with runtime.autocast():
            batch_loss, stats = model.loss(xb, yb)
        loss, correct = loss + float(batch_loss) * len(xb), correct + float(stats["acc"]) * len(xb)
    loss, correct, n = distributed.all_sum_floats(loss, correct, float(len(x)))
    return {"loss": loss / n, "acc": correct / n}


@speaks
def main() -> None:
    p = load_params()
    if (ranks_status := distributed.start("stages.train_classifier", p.compute)) is not None:
        raise SystemExit(ranks_status)  # this process launched the ranks, which did the work
    cfg = p.train_classifier
    runtime = resolve_runtime(p.compute)
    seed_everything(p.seed)
    with tracked_run("train_classifier", p) as run:
        (x_train, y_train), (x_val, y_val), (x_test, y_test) = (load_split(s) for s in ("train", "val", "test"))
        num_classes = int(max(y_train.max(), y_val.max(), y_test.max())) + 1
        c, h, w = x_train.shape[1:]
        model = Classifier(cfg.model, in_channels=c, num_classes=num_classes).to(runtime.device)
        runtime.optimise(model)
        params = sum(t.numel() for t in model.parameters())
        if distributed.is_main():
            print(f"train_classifier: {len(x_train)} images {h}x{w}x{c}, {num_classes} classes, {params:,} params, "
                  f"{runtime.device} {runtime.precision}")

        def step(idx):
            return model.loss(scale_images(x_train[idx].to(runtime.device)), y_train[idx].to(runtime.device))

        result = fit(
            model, len(x_train), step, lambda: evaluate(model, x_val, y_val, runtime), cfg.train, runtime,
            seed=p.seed, checkpoint=paths.checkpoint("train_classifier"), monitor="loss", on_epoch=run.log_epoch, desc="train_classifier",
            fingerprint=fingerprint(p.seed, p.compute, cfg, load_stats(paths.PREPARED)["sha256"]),
        )
        test = evaluate(model, x_test, y_test, runtime)
        if not distributed.is_main():  # rank 0 writes the outputs
            return distributed.finish()
        save_model(paths.CLASSIFIER, model, in_channels=c, num_classes=num_classes, image_shape=[h, w, c])
        metrics = {
            "test_accuracy": test["acc"], "test_loss": test["loss"],
            "val_accuracy": result.best["val_acc"], "val_loss": result.best["val_loss"],
            "params": params, "feature_dim": cfg.model.feature_dim, "num_classes": num_classes,
            "epochs": result.epochs, "best_epoch": result.best["epoch"], "stopped_early": result.stopped_early,
            "train_seconds": round(result.seconds, 1), "precision": runtime.precision, "device": runtime.device.type,
        }
        write_report(*paths.REPORTS["train_classifier"], metrics)
        run.log_metrics(metrics)
        paths.checkpoint("train_classifier").unlink(missing_ok=True)
        print(f"train_classifier: test accuracy {test['acc']:.4f} (val {metrics['val_accuracy']:.4f}), "
              f"{metrics['epochs']} epochs in {metrics['train_seconds']:.0f}s")
    distributed.finish()


if __name__ == "__main__":
    main()
