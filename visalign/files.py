"""Line-oriented logs that a killed run may leave half-written, read and repaired the same way everywhere."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    """Every complete JSON line of ``path`` ([] when absent). A torn line (what a kill mid-write leaves) is
    skipped, so a report or a resume never fails on a run that was stopped."""
    return read_jsonl_counted(path)[0]


def read_jsonl_counted(path: str | Path) -> tuple[list[dict], int]:
    """(the complete JSON rows of ``path``, how many torn or non-object lines were dropped)."""
    p = Path(path)
    if not p.exists():
        return [], 0
    rows, dropped = [], 0
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            dropped += 1
    return rows, dropped


def trim_jsonl(path: str | Path, keep) -> None:
    """Rewrite ``path`` (atomically) with only its complete rows for which ``keep(row)`` holds: on resume,
    the torn last line and the rows logged after the checkpoint go, so none is duplicated or glued."""
    p = Path(path)
    if not p.exists():
        return
    rows = [r for r in read_jsonl(p) if keep(r)]
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, p)


# ---- durable writes: what a kill, a power cut or a full disk may leave behind -------------------------------

MANIFEST = "manifest.json"


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every folder (their entries), so a rename that follows publishes
    bytes that are on the disk, not in the page cache."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            fsync_dir(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    """fsync a folder (its entries) or a file (its bytes)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(root: Path) -> None:
    """``root/manifest.json``: every other file's size and sha256, written last, so a folder with a manifest
    that matches is complete and unaltered (``check_manifest``)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (root / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def check_manifest(root: Path) -> str | None:
    """None when ``root`` matches its manifest; else the first problem, naming the file (missing, a size or a
    hash that differs, a manifest that cannot be read)."""
    try:
        entries = json.loads((root / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"{root / MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{root / MANIFEST} cannot be read ({type(e).__name__})"
    for rel, want in entries.items():
        p = root / rel
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != want["bytes"]:
            return f"{p} has {p.stat().st_size} bytes, the manifest says {want['bytes']}"
        if _sha256(p) != want["sha256"]:
            return f"{p} does not match its sha256 in the manifest"
    return None


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def refuse_output_over_input(out: str | Path, inputs: dict[str, str | Path], out_flag: str) -> None:
    """An output never writes onto its own input: ``out`` equal to an input, holding one, or lying inside
    one is refused (one line) before anything is written or deleted. ``inputs``: flag -> path."""
    from .errors import UserError

    o = Path(out).expanduser().resolve()
    for flag, given in inputs.items():
        if not given or not Path(given).expanduser().exists():
            continue  # a hub id or a built-in source: nothing on disk to protect
        i = Path(given).expanduser().resolve()
        if o == i or i.is_relative_to(o) or o.is_relative_to(i):
            raise UserError(f"{out_flag} {out}: is, holds or lies inside the input {flag} {given}; choose an "
                            f"{out_flag} outside it (nothing was written)")


def file_stamp(path: str | Path) -> str:
    """What any edit of a file changes: its size, mtime, ctime (which no one can set back, so an in-place
    edit that restores size and mtime still moves it) and inode (a file replaced by another)."""
    st = os.stat(path)
    return f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


def check_writable_folder(folder: str | Path, flag: str) -> Path:
    """Make ``folder`` (and its parents) and prove it takes a file, before any work: a path that is a file,
    read-only, or not permitted is one line naming the flag, not a failure after hours of sampling."""
    from .errors import UserError

    p = Path(folder).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".visalign-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot write there ({e.strerror or type(e).__name__}); choose a "
                        "writable folder") from None
    return p
