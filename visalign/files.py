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
