"""One writer per output folder: a run folder, a dataset being made, scores being written.

The lock is an exclusive ``flock`` on ``FOLDER/.visalign.lock``, held for the command's lifetime. The kernel
drops it when its process dies however it dies (SIGKILL included), so a lock left behind by a killed run is
never an obstacle: the next writer takes it and says whose it was. The file's text (pid, host, command,
start time) only names the holder in the refusal.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

LOCK_FILE = ".visalign.lock"


class FolderInUse(UserError):
    """Another live process writes to this folder."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(h: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"])) if h.get("since") else "?"
    return f"process {h.get('pid', '?')} on {h.get('host', '?')} ({h.get('command', '?')}, since {since})"


@contextlib.contextmanager
def hold_folder(folder: str | Path, flag: str, enabled: bool = True) -> Iterator[None]:
    """Hold ``folder``'s lock for the block; another live holder: one line naming the folder and the
    process (exit 2). ``flag`` is how the command spells the folder (``train.output_dir``, ``--out``);
    ``enabled=False`` (a non-main DDP rank) holds nothing."""
    if not enabled:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = _acquire(path, folder, flag)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # unlinked while still held: a waiter that opened this file re-checks the inode
        os.close(fd)


def _acquire(path: Path, folder: Path, flag: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(f"{flag}={str(folder)!r} is in use by {_describe(_holder(path))}; wait for it to "
                              f"finish, or choose another {flag}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the holder finished and removed the file between our open and flock
            same = False
        if same:
            break
        os.close(fd)
    stale = _holder(path)
    if stale.get("pid") and stale.get("pid") != os.getpid():
        print(f"{flag}={str(folder)!r}: took over the lock left by {_describe(stale)}, which is no longer running",
              file=sys.stderr)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
          "command": " ".join(["visalign", *sys.argv[1:3]]) if sys.argv else "visalign"}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return fd
