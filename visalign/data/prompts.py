"""Prompt sources: text files (one per line), GenEval metadata JSONL, datasets, and ShapesWorld splits."""

from __future__ import annotations

import json
from pathlib import Path


def read_prompts(source: str, column: str = "prompt") -> list[str]:
    """Prompts from 'shapes:train|eval|all', a .txt file, a .jsonl file (GenEval metadata) or a dataset."""
    if source.startswith("shapes:"):
        from ..worlds.shapes.render import prompt_records

        return [r["prompt"] for r in prompt_records(source.split(":", 1)[1])]
    p = Path(source)
    if p.suffix == ".txt" and p.exists():
        return [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    if p.suffix in (".jsonl", ".json") and p.exists():
        out = []
        for i, ln in enumerate(p.read_text().splitlines(), 1):
            if ln.strip():
                try:
                    rec = json.loads(ln)
                except json.JSONDecodeError:
                    raise ValueError(f"{source}:{i}: not valid JSON") from None
                if column not in rec:
                    raise ValueError(f"{source}:{i}: no {column!r} field")
                out.append(rec[column])
        return out
    from .pairs import load_any

    ds = load_any(source)
    for col in (column, "caption", "text"):
        if col in ds.column_names:
            return [str(x) for x in ds[col]]
    raise ValueError(f"{source}: no prompt column ({column!r}, 'caption' or 'text'); found {ds.column_names}")
