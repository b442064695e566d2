"""Image folders: a generated folder with one file of every bad kind; each lands under its reason, the good ones come
out at the requested size and mode, and the source folder is left as it was."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from vqprior.data.build import Deduplicator, Job, plan, write_splits
from vqprior.data.clean import CleanReport
from vqprior.data.folder import DecodeSpec, decode_file, decode_files, scan_folder
from vqprior.data.images import read_images

SPEC = DecodeSpec(size=16, channels=3, min_size=8, max_aspect=4.0)


def _gradient(w, h, mode="RGB"):
    x = np.linspace(0, 255, w, dtype=np.float64)[None, :].repeat(h, 0)
    rgb = np.stack([x, x[::-1, ::-1], np.full_like(x, 90)], axis=2).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def make_bad_folder(root, outside):
    """root/{shirts,shoes}/... with every kind of bad file `prepare` must handle; returns what each name should become."""
    shirts, shoes = root / "shirts", root / "shoes"
    shirts.mkdir(parents=True)
    shoes.mkdir()
    _gradient(40, 30).save(shirts / "good.jpg", quality=95)
    (shirts / "good_copy.jpg").write_bytes((shirts / "good.jpg").read_bytes())  # a duplicate under another name
    _gradient(33, 30, "L").save(shoes / "gray.png")
    buf = io.BytesIO()
    _gradient(64, 64).save(buf, format="JPEG", quality=95)
    (shirts / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (shirts / "empty.png").write_bytes(b"")
    (shirts / "notes.png").write_text("this is not an image\n")
    _gradient(30, 30).convert("CMYK").save(shoes / "cmyk.jpg")
    palette = _gradient(24, 24).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(shoes / "palette_alpha.png", transparency=0)
    deep = (np.linspace(0, 65535, 24 * 24).reshape(24, 24)).astype(np.uint16)
    Image.fromarray(deep).save(shoes / "deep16.png")  # a 16-bit grayscale PNG
    _gradient(4, 4).save(shoes / "tiny.png")
    _gradient(200, 20).save(shoes / "banner.png")  # aspect 10 > 4
    rotated = np.zeros((20, 40, 3), np.uint8)
    rotated[:, 20:] = 255  # stored: left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the black half ends up on top
    Image.fromarray(rotated).save(shirts / "rotated.jpg", exif=exif, quality=95)
    outside.mkdir()
    _gradient(20, 20).save(outside / "elsewhere.png")
    os.symlink(outside / "elsewhere.png", shoes / "link_out.png")
    return {
        "shirts/good.jpg": None, "shirts/good_copy.jpg": "duplicate", "shoes/gray.png": None,
        "shirts/truncated.jpg": "unreadable", "shirts/empty.png": "zero_bytes", "shirts/notes.png": "not_an_image",
        "shoes/cmyk.jpg": None, "shoes/palette_alpha.png": None, "shoes/deep16.png": None, "shoes/tiny.png": "too_small",
        "shoes/banner.png": "extreme_aspect", "shirts/rotated.jpg": None, "shoes/link_out.png": "link_outside_root",
    }


@pytest.fixture
def bad_folder(tmp_path):
    root = tmp_path / "images"
    expected = make_bad_folder(root, tmp_path / "outside")
    return root, expected


def _tree(root):
    return {str(p.relative_to(root)): (p.is_symlink(), p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def test_scan_finds_classes_and_rejects_links_out_of_the_root(bad_folder):
    root, expected = bad_folder
    scan = scan_folder(root)
    assert scan.classes == ["shirts", "shoes"]
    assert scan.rejected == [("shoes/link_out.png", "link_outside_root")]
    names = dict(scan.files["all"])
    assert set(names) == {k for k, v in expected.items() if v != "link_outside_root"}
    assert names["shirts/good.jpg"] == 0 and names["shoes/gray.png"] == 1


def test_every_bad_kind_gets_its_reason_and_the_good_ones_their_size_and_mode(bad_folder, tmp_path):
    root, expected = bad_folder
    before = _tree(root)
    scan = scan_folder(root)
    report = CleanReport()
    for rel, reason in scan.rejected:
        report.drop(reason, "scan", examples=[rel])
    # one good image each to val and test, everything else to train (train first, as `plan` orders them)
    to = {"shoes/cmyk.jpg": "val", "shoes/gray.png": "test"}
    jobs = sorted((Job(name, label, to.get(name, "train")) for name, label in scan.files["all"]),
                  key=lambda j: j.split == "test")
    decoded = ((px, reason) for _, px, reason in decode_files(root, [j.name for j in jobs], SPEC, workers=2))
    writers = write_splits(jobs, decoded, SPEC, tmp_path / "out", report, Deduplicator())

    got = {name: reason for reason, names in report.examples.items() for name in names}
    assert got == {k: v for k, v in expected.items() if v}
    assert sum(sum(v.values()) for v in report.dropped.values()) == sum(1 for v in expected.values() if v)
    kept = sum(w.count for w in writers.values())
    assert kept == sum(1 for v in expected.values() if v is None) == 6
    for split in ("train", "val", "test"):
        images = read_images(tmp_path / "out" / f"{split}.parquet")
        assert images.images.shape[1:] == (16, 16, 3) and images.images.dtype == np.uint8
    assert _tree(root) == before  # the source folder is never modified
    json.dumps(report.as_dict())  # the report is plain JSON


@pytest.mark.parametrize("name, check", [
    ("shoes/cmyk.jpg", lambda x: x.std() > 10),
    ("shoes/palette_alpha.png", lambda x: (x == 255).all(axis=2).any()),  # the transparent colour is now white
    ("shoes/deep16.png", lambda x: x.min() < 30 and x.max() > 220),  # the 16-bit range kept its spread
    ("shoes/gray.png", lambda x: (x[..., 0] == x[..., 1]).all()),  # gray made RGB by repetition
])
def test_odd_modes_become_rgb(bad_folder, name, check):
    root, _ = bad_folder
    pixels, reason = decode_file(root / name, SPEC)
    assert reason is None and pixels.shape == (16, 16, 3) and check(pixels)


def test_exif_orientation_is_applied_and_gray_output_works(bad_folder):
    root, _ = bad_folder
    pixels, reason = decode_file(root / "shirts/rotated.jpg", DecodeSpec(size=16, channels=1))
    assert reason is None and pixels.shape == (16, 16, 1)
    assert pixels[:6].mean() < 40 and pixels[-6:].mean() > 215  # black on top after the 90-degree turn


def test_resize_is_antialiased_and_centre_cropped(tmp_path):
    stripes = np.zeros((64, 128), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: a point-sampled shrink would alias to solid black or white
    Image.fromarray(stripes).save(tmp_path / "stripes.png")
    pixels, _ = decode_file(tmp_path / "stripes.png", DecodeSpec(size=16, channels=1))
    assert pixels.shape == (16, 16, 1) and 100 < pixels.mean() < 155 and pixels.std() < 20


def test_near_duplicates_are_dropped_only_when_asked(tmp_path):
    a = np.asarray(_gradient(32, 32, "L").convert("RGB"))  # brightness rising left to right
    b = a.copy()
    b[0, 0] = 0  # one pixel changed: a new exact hash, the same perceptual hash
    assert Deduplicator().check(a, "train") is None
    exact = Deduplicator()
    assert exact.check(a, "train") is None and exact.check(b, "train") is None
    near = Deduplicator(near_bits=4)
    assert near.check(a, "train") is None and near.check(b, "test") == "near_duplicate"
    assert near.check(a, "test") == "duplicate_of_earlier_split"
    assert near.check(np.ascontiguousarray(a[:, ::-1]), "train") is None  # mirrored: every hash bit flips


def test_plan_carves_test_and_val_seeded_and_disjoint():
    items = [(f"f{i}.png", i % 3) for i in range(200)]
    a = plan({"all": items}, np.random.default_rng(1), val_fraction=0.1, test_fraction=0.2)
    b = plan({"all": items}, np.random.default_rng(1), val_fraction=0.1, test_fraction=0.2)
    assert a == b and sorted(j.name for j in a) == sorted(n for n, _ in items)
    counts = {s: sum(j.split == s for j in a) for s in ("train", "val", "test")}
    assert counts == {"train": 144, "val": 16, "test": 40}
    assert [j.split for j in a][-40:] == ["test"] * 40  # the train pool first: test loses the cross-split duplicates
    kept = plan({"train": items[:100], "test": items[100:]}, np.random.default_rng(0), val_fraction=0.5,
                test_fraction=0.2, max_train=40, max_test=10)
    assert sum(j.split == "test" for j in kept) == 10 and sum(j.split != "test" for j in kept) == 40
