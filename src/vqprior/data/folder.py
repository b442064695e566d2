"""Folders of image files as a data source: found without leaving the root, decoded on all cores, each bad file
dropped with a reason.

Layouts: `root/[class/]file` (one pool; `prepare` carves test and val from it) or `root/{train,test}/[class/]file`.
First-level folders under a split are classes (labels in sorted-name order); files beside them have no label (-1).

Every decoded image comes out the same way: EXIF orientation applied; palette, alpha, CMYK and 16-bit images
turned into L or RGB (transparent areas on white); the short side resized with antialiasing, then a centre crop.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

IMAGE_SUFFIXES = {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp"}
SPLIT_FOLDERS = ("train", "test")

# reason codes for files that never become images (those found by looking at pixels live in clean.py)
ZERO_BYTES, NOT_AN_IMAGE, UNREADABLE = "zero_bytes", "not_an_image", "unreadable"
TOO_SMALL, EXTREME_ASPECT, LINK_OUTSIDE_ROOT = "too_small", "extreme_aspect", "link_outside_root"
# entries skipped on purpose, each under its own reason so the report adds up to everything seen
HIDDEN, SYMLINK_LOOP, BROKEN_LINK, LINK_TO_FOLDER = "hidden", "symlink_loop", "broken_link", "link_to_folder"
FOLDER_NAMED_LIKE_IMAGE, OUTSIDE_SPLIT_FOLDERS = "folder_named_like_image", "outside_split_folders"


@dataclass(frozen=True)
class DecodeSpec:
    size: int  # output images are size x size
    channels: int  # 1 (L) or 3 (RGB)
    min_size: int = 1  # a shorter side below this is `too_small`
    max_aspect: float = 1e9  # long side / short side above this is `extreme_aspect`


@dataclass
class FolderScan:
    files: dict[str, list[tuple[str, int]]]  # split ("all" or train/test) -> (path relative to root, label)
    classes: list[str]  # label i is classes[i]
    rejected: list[tuple[str, str]]  # (relative path, reason) of entries not even worth decoding; a folder's ends in /


def _link_problem(path: Path, real_root: Path) -> str | None:
    """Why a symbolic link is not followed (a loop, a dead end, out of the root, a folder), or None for a link to a
    file inside the root."""
    try:
        target = path.resolve(strict=True)
    except RuntimeError:  # Python 3.11's resolve() says "Symlink loop" this way
        return SYMLINK_LOOP
    except FileNotFoundError:
        return BROKEN_LINK
    except OSError as exc:
        return SYMLINK_LOOP if exc.errno == errno.ELOOP else BROKEN_LINK
    if not target.is_relative_to(real_root):
        return LINK_OUTSIDE_ROOT
    return LINK_TO_FOLDER if target.is_dir() else None  # a folder inside the root: its files are found where they live


def scan_folder(root: str | Path) -> FolderScan:
    """Every regular file under `root`, in sorted order. Hidden entries, symbolic links that loop, dangle, lead out
    of the root or to a folder (no cycles, no second copies) and folders named like images are rejected with a reason
    each; so are entries beside train/ and test/ in a split layout."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    real_root = root.resolve()
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    split_roots = {s: root / s for s in SPLIT_FOLDERS} if set(SPLIT_FOLDERS) <= set(subdirs) else {"all": root}
    classes = sorted({d.name for base in split_roots.values() for d in base.iterdir()
                      if d.is_dir() and not d.is_symlink() and not d.name.startswith(".")})
    files, rejected = {}, []
    if "all" not in split_roots:
        rejected += [(e.name + ("/" if e.is_dir() else ""), HIDDEN if e.name.startswith(".") else OUTSIDE_SPLIT_FOLDERS)
                     for e in sorted(root.iterdir()) if e.name not in SPLIT_FOLDERS]
    for split, base in split_roots.items():
        found = []
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            here = Path(dirpath)
            for d in sorted(dirnames):  # os.walk lists links to folders here, and loops too
                rel = str((here / d).relative_to(root))
                if d.startswith("."):
                    rejected.append((rel + "/", HIDDEN))
                elif (here / d).is_symlink():
                    rejected.append((rel, _link_problem(here / d, real_root) or LINK_TO_FOLDER))
                elif Path(d).suffix.lower() in IMAGE_SUFFIXES:  # walked into, but worth a word in the report
                    rejected.append((rel + "/", FOLDER_NAMED_LIKE_IMAGE))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (here / d).is_symlink())
            for name in sorted(filenames):
                path = here / name
                rel = str(path.relative_to(root))
                if name.startswith("."):
                    rejected.append((rel, HIDDEN))
                    continue
                if path.is_symlink() and (problem := _link_problem(path, real_root)):
                    rejected.append((rel, problem))
                    continue
                parts = path.relative_to(base).parts
                label = classes.index(parts[0]) if len(parts) > 1 else -1
                found.append((rel, label))
        files[split] = found
    return FolderScan(files, classes, rejected)


def entry_facts(path: str | Path, content: bool = True) -> dict:
    """A file's manifest facts: size, permission bits and (with `content`) the sha256 of its bytes. The link itself
    is described, not its target, so a loop or a dangling link has facts too."""
    try:
        st = os.lstat(path)
    except OSError:
        return {}
    facts = {"size": st.st_size, "mode": stat.S_IMODE(st.st_mode)}
    if content:
        try:
            with open(path, "rb") as f:  # follows a link to a file inside the root, which is what was decoded
                facts["hash"] = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:  # a loop, a dangling link, a folder: no content to hash
            pass
    return facts


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit gray: keep the top 8 bits of the full range
        wide = np.asarray(im, dtype=np.int64)
        im = Image.fromarray(np.clip(wide >> 8 if wide.max() > 255 else wide, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" or "transparency" in im.info:
        im = im.convert("RGBA")  # a palette's transparent index becomes real alpha
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    return im.convert("L" if channels == 1 else "RGB")  # CMYK, YCbCr, 1-bit ... by Pillow's conversions


def _resize_crop(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new != im.size:
        im = im.resize(new, Image.Resampling.LANCZOS)  # Pillow's resize filters antialias when shrinking
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return im.crop((left, top, left + size, top + size))


def decode_file(path: str | Path, spec: DecodeSpec) -> tuple[np.ndarray | None, str | None]:
    """(H x W x C uint8, None) for a good file, (None, reason) for a bad one."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return None, ZERO_BYTES
        with Image.open(path) as im:
            im.load()  # a truncated file fails here, not at open
            im = ImageOps.exif_transpose(im)
            w, h = im.size
            if min(w, h) < spec.min_size:
                return None, TOO_SMALL
            if max(w, h) / min(w, h) > spec.max_aspect:
                return None, EXTREME_ASPECT
            pixels = np.asarray(_resize_crop(_to_mode(im, spec.channels), spec.size), dtype=np.uint8)
    except UnidentifiedImageError:
        return None, NOT_AN_IMAGE
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None, UNREADABLE
    return (pixels[..., None] if pixels.ndim == 2 else pixels), None


def _decode_one(job):
    path, spec = job
    return decode_file(path, spec)


def decode_files(root: str | Path, relpaths: list[str], spec: DecodeSpec, workers: int = 0, desc: str = "decode",
                 chunk: int = 64):
    """Yield (index, pixels or None, reason or None) in input order, decoding on `workers` processes (0: all cores)."""
    workers = workers or os.cpu_count() or 1
    jobs = ((str(Path(root) / rel), spec) for rel in relpaths)
    with tqdm(total=len(relpaths), desc=desc, unit="img", disable=None) as bar:
        if workers == 1:
            results = map(_decode_one, jobs)
            for i, (pixels, reason) in enumerate(results):
                bar.update()
                yield i, pixels, reason
            return
        with get_context("spawn").Pool(workers) as pool:  # spawn: no fork of a process holding torch threads
            for i, (pixels, reason) in enumerate(pool.imap(_decode_one, jobs, chunksize=chunk)):
                bar.update()
                yield i, pixels, reason
