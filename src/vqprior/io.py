"""Files in and out: atomic writes (a killed process leaves the old file or none, never half of one) of JSON, CSV, text
and arrays; a file's hash; and where `sample`'s extra sample sets live, so `sample` and `evaluate` agree on it."""
from __future__ import annotations

import contextvars
import csv
import errno
import glob
import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import OutputError


# errors of a write that are the machine's, not the code's: said in one line naming the file
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, -1}


SHORT_WRITE = -1  # numpy's tofile reports a refused write as "N requested and M written", without an errno


def _errno(exc: OSError) -> int | None:
    """The errno of an OSError; pyarrow's carry it only in their text ("[errno 28] No space left on device")."""
    if exc.errno is not None:
        return exc.errno
    if re.fullmatch(r"\d+ requested and \d+ written", str(exc)):
        return SHORT_WRITE
    found = re.search(r"\[errno (\d+)\]", str(exc), re.IGNORECASE)
    return int(found.group(1)) if found else None


def _why(code: int) -> str:
    return "the disk took only part of it: full, or a file size limit" if code == SHORT_WRITE else os.strerror(code)


def _umask() -> int:
    """The process's umask without setting it (os.umask sets it, which would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files that writers of `path` left when they were killed (their process is gone):
    a killed stage re-run by hand would otherwise leave them beside its outputs, where a pipeline tool sees a change."""
    path, removed = Path(path), []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path in the same folder; rename it onto `path` only if the block succeeds.

    The temporary name carries the writer's pid, so a later writer can tell a killed writer's leftovers from a live
    one's. The file gets the mode of any other new file (0644 under the usual umask), not mkstemp's 0600. A write the
    machine refuses (disk full, a size limit, no permission) becomes an OutputError naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError as exc:  # only the output's folder is touched so far: whatever failed is about it
        raise OutputError(path, exc.strerror or str(exc)) from None
    group, handed_over = _GROUP.get(), False
    try:
        yield Path(tmp)
        if group is None:
            os.replace(tmp, path)
        else:
            group.append((tmp, path))  # renamed (or removed) with the whole group
            handed_over = True
    except OSError as exc:
        if _errno(exc) in _WRITE_ERRNOS and exc.filename in (None, tmp, str(path)):  # not an input the block read
            raise OutputError(path, _why(_errno(exc))) from None
        raise
    finally:
        if not handed_over and os.path.exists(tmp):
            os.unlink(tmp)


_GROUP: contextvars.ContextVar[list | None] = contextvars.ContextVar("atomic_group", default=None)


@contextmanager
def atomic_group():
    """Files written with atomic_path inside the block appear together, when the whole block has succeeded, or none
    of them does: a stage that writes several files that belong together (the three prepared splits, the three code
    files) never leaves new ones beside old ones when a later one fails."""
    if _GROUP.get() is not None:  # nested: the outer group commits
        yield
        return
    done: list[tuple[str, Path]] = []
    token = _GROUP.set(done)
    try:
        yield
        _GROUP.reset(token)
        token = None
        for tmp, path in done:
            os.replace(tmp, path)
    finally:
        if token is not None:
            _GROUP.reset(token)
        for tmp, _ in done:
            if os.path.exists(tmp):
                os.unlink(tmp)


def file_hash(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks (models and Parquet files can be large)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def write_json_atomic(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_report(detail_path: str | Path, headline_path: str | Path | None, values: dict,
                 headline: Mapping[str, str] | None = None) -> None:
    """Every one of `values` to `detail_path`; with `headline` (column -> key of `values`), those few under their short
    column names to `headline_path` too: the numbers compared from run to run, few and with names shared across
    reports (`fid`, `precision`, ...), so that one table of every report's headline stays one screen wide."""
    if headline:
        write_json_atomic(headline_path, {column: values[key] for column, key in headline.items()})
    write_json_atomic(detail_path, values)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def extra_sample_set(folder: str | Path, seed: int) -> Path:
    """The images `sample` drew with `seed` beside the headline set (`sample.seeds` > 1)."""
    return Path(folder) / f"images_seed{seed}.npy"


def extra_sample_sets(folder: str | Path) -> list[Path]:
    """Every extra sample set in `folder`, in seed order."""
    return sorted(Path(folder).glob("images_seed*.npy"), key=lambda f: int(f.stem.removeprefix("images_seed")))


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Rows of scalars -> CSV (columns in first-seen order; floats to 6 significant digits)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def write_history_csv(path: str | Path, history: list[dict]) -> None:
    """Per-epoch metrics, numbered from 1 in an `epoch` column first."""
    write_csv(path, [{"epoch": epoch} | {k: v for k, v in row.items() if k != "epoch"}
                     for epoch, row in enumerate(history, start=1)])
