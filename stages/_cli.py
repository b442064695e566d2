"""How a stage speaks: the library raises typed errors (vqprior.errors); a stage run turns each into one line on stderr
that says what is wrong and which `dvc repro` fixes it, and exits with status 1. Anything else is a bug and keeps its
traceback."""
from __future__ import annotations

import errno
import functools
import os

from vqprior.errors import InputError, VqpriorError

# refusals of the machine, not bugs: a file the stage reads or a folder it writes that it may not touch
_MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR,
                   errno.ENOTDIR, errno.ELOOP, errno.EIO}


def message(exc: BaseException) -> str | None:
    """The one line for `exc`, or None when it is a bug."""
    if isinstance(exc, InputError):
        todo = f"run `dvc repro {exc.writer}` first" if exc.missing else f"re-run `dvc repro {exc.writer}`"
        return f"error: {exc.path} {exc.problem}; {todo}"
    if isinstance(exc, VqpriorError):
        return f"error: {exc}"
    if isinstance(exc, OSError) and exc.errno in _MACHINE_ERRNOS and exc.filename:
        return f"error: {exc.filename}: {exc.strerror}; fix the path's permissions or free space and run again"
    return None


def other_rank() -> bool:
    """A rank other than 0 of a stage run as several processes (torchrun sets RANK): it neither speaks nor logs."""
    return os.environ.get("RANK", "0") != "0"


def speaks(main):
    """Decorate a stage's main(): a library error ends the process with its one line (SystemExit prints it)."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as exc:
            line = message(exc)
            if line is None:
                raise
            if other_rank():  # every rank meets the same error: rank 0 alone says it
                raise SystemExit(1) from None
            raise SystemExit(line) from None

    return run
