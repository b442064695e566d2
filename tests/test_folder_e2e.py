"""The whole DAG on a folder of image files (the smoke profile with data.source: image_folder): real Fashion-MNIST
images written as PNG and JPEG files in class folders, plus a few bad files that `prepare` must drop."""
import json

import numpy as np
import yaml
from PIL import Image

from conftest import DVC, copy_repo, require_fashion_mnist, run
from vqprior.data.sources import DEBIAN_FASHION_MNIST, load_idx_dataset

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def write_folder(root, n=1200):
    raw = load_idx_dataset(DEBIAN_FASHION_MNIST)["train"]
    for i in range(n):
        folder = root / CLASSES[raw.labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(raw.images[i, ..., 0]).resize((56, 56), Image.Resampling.BICUBIC)
        image.save(folder / (f"{i:05d}.png" if i % 2 else f"{i:05d}.jpg"))
    (root / "bag" / "empty.png").write_bytes(b"")
    (root / "bag" / "readme.png").write_text("not an image")
    (root / "coat" / "again.png").write_bytes((root / "coat").glob("*.png").__next__().read_bytes())


def test_smoke_dag_on_an_image_folder(tmp_path):
    require_fashion_mnist()
    repo = copy_repo(tmp_path / "repo")
    write_folder(tmp_path / "images")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source="image_folder", root=str(tmp_path / "images"), image_size=28, channels=1)
    params["prepare"].update(max_train=None, max_test=None, test_fraction=0.2, normalisation="standardize")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    proc = run([*DVC, "repro"], repo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((repo / "reports/prepare.json").read_text())
    dropped = {reason: sum(by_split.values()) for reason, by_split in report["dropped"].items()}
    assert dropped == {"zero_bytes": 1, "not_an_image": 1, "duplicate": 1} or (
        dropped.pop("duplicate_of_earlier_split", 0) == 1 and dropped == {"zero_bytes": 1, "not_an_image": 1})
    sizes = report["split_sizes"]
    assert sum(sizes.values()) == 1200 and 200 < sizes["test"] < 280  # 20 % of the 1,203 files held out
    assert set(report["class_balance"]["train"]) == {str(i) for i in range(10)}  # JSON keys are strings
    stats = json.loads((repo / "data/prepared/stats.json").read_text())
    assert stats["image_shape"] == [28, 28, 1] and stats["classes"] == sorted(CLASSES)
    # standardisation with the train split's statistics, inverted wherever pixels come back out
    norm, train_stats = stats["normalisation"], stats["train_pixel_stats"]
    assert norm["kind"] == "standardize" and norm["mean"] == train_stats["mean"] and 0.2 < norm["std"][0] < 0.45
    assert json.loads((repo / "metrics/train_vqvae.json").read_text())["mse"] < 0.03  # in [0, 1] pixel units
    samples = np.load(repo / "data/samples/images.npy")
    assert samples.dtype == np.uint8 and abs(samples.mean() / 255 - norm["mean"][0]) < 0.08
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    assert 0 < ev["fid"] < 400 and np.isfinite(ev["classifier_fid"])
    assert json.loads((repo / "reports/train_classifier_detail.json").read_text())["test_accuracy"] > 0.3
