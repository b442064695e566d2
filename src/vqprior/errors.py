"""The library's errors: each is a problem with the user's params, data, files or machine, never a bug, and its message
is one line saying what is wrong and what to do. The library raises them and never ends the process; the stages (or a
notebook) decide how to speak. A file one step of the pipeline reads and another wrote carries both names, so a caller
can say which step to run again."""
from __future__ import annotations

from pathlib import Path


class VqpriorError(Exception):
    """Base of every error the library raises on purpose."""


class ParamsError(VqpriorError):
    """A params file or value that cannot be used: names the key and the allowed values."""


class DataError(VqpriorError):
    """Raw data that is missing, damaged or unusable."""


class TrainingError(VqpriorError):
    """Training that cannot go on (a non-finite loss) or that the params ask to stop (a collapsed codebook)."""


class InputError(VqpriorError):
    """A file that an earlier step writes is missing or unusable: `path` is the file, `writer` the step that writes it
    (a pipeline stage's name), `problem` what is wrong with it, as words that follow the path."""

    def __init__(self, path: str | Path, writer: str, problem: str = "not found"):
        self.path, self.writer, self.problem = Path(path), writer, problem
        super().__init__(f"{path} {problem}; {'run' if self.missing else 're-run'} the '{writer}' step "
                         f"that writes it{' first' if self.missing else ''}")

    @property
    def missing(self) -> bool:
        return self.problem == "not found"


class UnsafeFile(InputError):
    """A file that would run code when loaded (a pickle with objects beyond tensors and plain values)."""


class OutputError(VqpriorError):
    """A file could not be written (no space, a size limit, no permission); the earlier output is unchanged."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"cannot write {path} ({reason}); free space or fix the folder's permissions and run again "
                         "(the earlier output is unchanged)")


def require(path: str | Path, writer: str) -> Path:
    """`path` if it exists, else the InputError that names the step writing it."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, writer)
    return path
