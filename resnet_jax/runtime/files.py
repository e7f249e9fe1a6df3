"""Writing files a user keeps: all or nothing, never half-written, and one clear line on failure."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from resnet_jax.runtime.errors import UserError

__all__ = ["atomic_write", "make_folder", "remove_stale_temporaries", "write_error"]

TEMPORARY_SUFFIX = ".tmp"
# `.best.msgpack.k2j4_x9a.tmp`: mkstemp's eight random characters between name and suffix.
_TEMPORARY_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")

# What to do about the operating system's refusals to write a file, by errno.
_ADVICE = {
    errno.ENOSPC: "the disk is full; free some space and try again",
    errno.EDQUOT: "the disk quota is used up; free some space and try again",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "permission denied; choose a folder you can write to",
    errno.EROFS: "the file system is read-only; choose another folder",
    errno.EISDIR: "it is a folder; give a file name",
    errno.ENOTDIR: "part of its folder path is a file; choose another path",
    errno.EEXIST: "part of its folder path is a file; choose another path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter one",
    errno.EIO: "the disk reported an input/output error; check it and try again",
}


def write_error(path: str | os.PathLike, error: OSError) -> UserError:
    """The one-line UserError for an OSError met while writing `path`."""
    advice = _ADVICE.get(error.errno, f"{error.strerror or error}; check the path and try again")
    return UserError(f"Cannot write {path}: {advice}.")


def make_folder(path: str | os.PathLike) -> None:
    """Create the folder `path` (and its parents) if missing; a refusal is write_error's line."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path, e) from None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file beside `path`, then rename it over `path` in one step.

    An interrupted write (exception, kill -9, full disk) leaves `path` as it was before; a file
    system refusal (full disk, read-only or missing folder, `path` a folder) is a UserError.
    Errors raised by the caller's own code inside the block pass through unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX
        )
    except OSError as e:
        raise write_error(path, e) from None
    try:
        # mkstemp makes the file private (0600); give it the permissions open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        if e.errno not in _ADVICE:  # not a refusal to write: the caller's own error
            raise
        raise write_error(path, e) from None
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an `atomic_write` killed mid-write left in `folder`."""
    removed = []
    for tmp in Path(folder).glob(f".*{TEMPORARY_SUFFIX}"):
        if not _TEMPORARY_NAME.fullmatch(tmp.name):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed
