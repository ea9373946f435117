"""User-facing errors: one line naming what is wrong, where, and what to pass instead.

Every failure a user can cause (a bad flag, file, value or checkpoint) is a ``UserError``; the CLI
prints it as ``error: ...`` and exits 2. Anything else is a bug and keeps its traceback.

Messages name keys the way the running command spells them: ``finetune`` takes ``model.path=``,
``eval`` takes ``--model``. A command declares its spellings with ``spelling({...})`` and error
builders write ``spelled("model.path")``.
"""

from __future__ import annotations

import contextlib
import errno
import math
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path


class UserError(ValueError):
    """A problem with what the user passed; the message is one line and says what to pass instead."""


class ModelLoadError(UserError, RuntimeError):
    """Weights could not be found or read; the message says what to pass instead."""


class CheckpointError(UserError):
    """A checkpoint or weights file that cannot be read (truncated, not safetensors, wrong kind)."""


_SPELLINGS: ContextVar[dict[str, str] | None] = ContextVar("visalign_spellings", default=None)


@contextlib.contextmanager
def spelling(mapping: dict[str, str]) -> Iterator[None]:
    """Within the block, ``spelled(key)`` returns the command's own spelling of ``key`` (e.g. ``--model ``)."""
    token = _SPELLINGS.set({**(_SPELLINGS.get() or {}), **mapping})
    try:
        yield
    finally:
        _SPELLINGS.reset(token)


def spelled(key: str) -> str:
    """How the running command spells ``key`` before its value: ``'model.path='`` or ``'--model '``."""
    return (_SPELLINGS.get() or {}).get(key, f"{key}=")


def require_positive(value, key: str, allow_zero: bool = False) -> None:
    """Raise a UserError naming ``key`` unless ``value`` is a finite number > 0 (>= 0 with ``allow_zero``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise UserError(f"{key}={value!r}: expected a {'non-negative' if allow_zero else 'positive'} finite number")


def host_memory_bytes() -> int:
    """The machine's physical memory in bytes (0 where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def require_fits_memory(nbytes: float, what: str) -> None:
    """Refuse, before the work starts, a size whose held tensors cannot fit this machine's memory: ``what``
    names the flag and the size ("--n 1000000000: 1e9 images of 3x64x64 held for FID")."""
    total = host_memory_bytes()
    if total and nbytes > total:
        raise UserError(f"{what} need {nbytes / 2**30:,.1f} GiB at once, more than this machine's "
                        f"{total / 2**30:,.1f} GiB; choose a smaller size")


def read_text(path: str | Path, what: str) -> str:
    """A text file's contents as UTF-8, with one clear error for a missing, unreadable or non-UTF-8 file."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what}={str(path)!r}: no such file")
    if p.is_dir():
        raise UserError(f"{what}={str(path)!r}: is a folder, expected a file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what}={str(path)!r}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise UserError(f"{what}={str(path)!r}: cannot read it ({e.strerror})") from None


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type), for wrapping third-party errors."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


# OS errors a user's paths or machine cause (not bugs): the CLI prints them as one line naming the path
USER_ERRNOS = frozenset(getattr(errno, n) for n in (
    "ENOENT", "EACCES", "EPERM", "EISDIR", "ENOTDIR", "EEXIST", "EROFS", "ENOSPC", "EFBIG", "EDQUOT",
    "ENAMETOOLONG", "ELOOP", "ENOTEMPTY", "EXDEV", "EBUSY", "ETXTBSY") if hasattr(errno, n))


def os_error_line(e: OSError) -> str | None:
    """One line for an OS error a user can fix (full disk, read-only or missing folder, a file where a folder
    should be), naming the path; None for anything else (a bug keeps its traceback)."""
    if e.errno not in USER_ERRNOS:
        return None
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f) or "(path not given)"
    hint = {errno.ENOSPC: "free some space", errno.EFBIG: "the file is over the size limit",
            errno.EROFS: "choose a writable folder", errno.EACCES: "check its permissions",
            errno.EPERM: "check its permissions", errno.EISDIR: "pass a file, not a folder",
            errno.ENOTDIR: "a path component is a file, not a folder"}.get(e.errno, "check the path")
    return f"{where}: {e.strerror or type(e).__name__} ({hint})"
