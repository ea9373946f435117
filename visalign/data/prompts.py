"""Prompt sources: text files (one per line), GenEval metadata JSONL, datasets, named prompt sets, and a
world's own (``SCHEME:SPEC`` through ``PROMPT_SOURCES``, e.g. ShapesWorld's ``shapes:eval``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError, read_text, spelled
from ..registry import PROMPT_SOURCES


def read_prompts(source: str, column: str = "prompt", key: str = "data.path") -> list[str]:
    """Prompts from a world's named split (``SCHEME:SPEC``, e.g. shapes:eval), a text file (one per line), a
    GenEval metadata JSONL or a dataset.

    A file's format is told by its suffix (.txt, .jsonl, .json) or, for any other name, by its first line
    (a JSON object: metadata; else one prompt per line). ``key`` is the setting the user typed, for errors.
    """
    where = f"{spelled(key)}{source!r}" if source else spelled(key).rstrip("= ")
    if not source:
        raise UserError(f"{where}: no prompt source given; pass a text file, a GenEval .jsonl, {_world_splits()} "
                        "or a dataset")
    scheme, _, spec = source.partition(":")
    if spec and scheme.isidentifier() and scheme in PROMPT_SOURCES:  # a world's named prompts, e.g. shapes:eval
        return PROMPT_SOURCES.get(scheme)(spec, where)
    from ..prompt_sets import NAMED, named_prompt_set

    p = named_prompt_set(source) or Path(source)
    if not p.exists() and "/" not in source and not source.startswith("."):
        raise UserError(f"{where}: no such file, and not a named prompt set ({', '.join(NAMED)}, {_world_splits()}) "
                        "or a hub dataset id (owner/name)")
    if p.is_file() and p.suffix not in (".parquet", ".arrow"):
        prompts = _from_text(read_text(p, spelled(key).rstrip("= ")), column, where, p.suffix)
    else:
        prompts = _from_dataset(source, column)
    if not prompts:
        raise UserError(f"{where}: holds no prompts")
    return prompts


def _world_splits() -> str:
    """The worlds' prompt sources as a user types them (``shapes:train|eval|all``): each registered scheme with
    the specs its source lists in ``specs``."""
    return ", ".join(f"{scheme}:{'|'.join(getattr(PROMPT_SOURCES.get(scheme), 'specs', ('SPLIT',)))}"
                     for scheme in PROMPT_SOURCES.names()) or "a world's SCHEME:SPLIT"


def _from_text(text: str, column: str, where: str, suffix: str) -> list[str]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if suffix not in (".jsonl", ".json") and not (lines and lines[0].lstrip().startswith("{")):
        return [ln.strip() for ln in lines]
    out = []
    for i, ln in enumerate(text.splitlines(), 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} line {i}: not valid JSON ({e.msg}); expected one JSON object per line "
                            "(GenEval metadata) or one prompt per line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(column), str):
            raise UserError(f"{where} line {i}: expected a JSON object with a text {column!r} field")
        out.append(rec[column])
    return out


def _from_dataset(source: str, column: str) -> list[str]:
    from .pairs import DataError, load_any

    ds = load_any(source)
    for col in (column, "caption", "text"):
        if col in ds.column_names:
            return [str(x) for x in ds[col]]
    raise DataError(f"{source}: no prompt column ({column!r}, 'caption' or 'text'); found {ds.column_names}")


def read_prompt_tags(source: str) -> list[str] | None:
    """The task tag of each prompt ``read_prompts`` returns, where the source has them: a world's split with
    GenEval metadata (``METADATA_SOURCES``) or a GenEval metadata .jsonl (its 'tag' field); else None."""
    from ..registry import METADATA_SOURCES

    scheme, _, spec = source.partition(":")
    if spec and scheme.isidentifier() and scheme in METADATA_SOURCES and not Path(source).exists():
        return [str(r["tag"]) for r in METADATA_SOURCES.get(scheme)(spec, "data.path")]
    p = Path(source)
    if not (p.is_file() and p.suffix in (".jsonl", ".json")):
        return None
    records = [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
    if records and all(isinstance(r, dict) and isinstance(r.get("tag"), str) for r in records):
        return [r["tag"] for r in records]
    return None


def validation_split(prompts: list[str], tags: list[str] | None, fraction: float) -> tuple[list[int], list[int]]:
    """(training indices, validation indices) of a prompt list: within each task tag, the round(fraction·n)
    prompts whose SHA-1 is smallest are held back, but never a task's last training prompt.

    The choice depends only on the prompt texts, so every run, resume and rank holds back the same prompts,
    in whatever order the source lists them. The split lies inside the *training* prompts: it chooses
    checkpoints without touching the held-out split the final numbers are measured on."""
    import hashlib

    groups: dict[str, list[int]] = {}
    for i, tag in enumerate(tags if tags is not None else [""] * len(prompts)):
        groups.setdefault(tag, []).append(i)
    held: set[int] = set()
    for members in groups.values():
        distinct = sorted({prompts[i] for i in members}, key=lambda p: hashlib.sha1(p.encode()).hexdigest())
        take = set(distinct[:min(len(distinct) - 1, round(fraction * len(distinct)))])
        held |= {i for i in members if prompts[i] in take}  # a prompt listed twice goes to one side only
    return [i for i in range(len(prompts)) if i not in held], sorted(held)


def prompts_and_tags(source: str, with_tags: bool = True,
                     key: str = "data.path") -> tuple[list[str], list[str] | None]:
    """``source``'s prompts, and their tags where asked and the source has one per prompt."""
    prompts = read_prompts(source, key=key)
    tags = read_prompt_tags(source) if with_tags else None
    return prompts, tags if tags is not None and len(tags) == len(prompts) else None


def training_prompts(source: str, fraction: float, with_tags: bool) -> tuple[list[str], list[str] | None]:
    """``source``'s prompts (and tags, when asked and the source has them) less its validation split."""
    prompts, tags = prompts_and_tags(source, with_tags or bool(fraction))
    if fraction:
        keep, _ = validation_split(prompts, tags, fraction)
        prompts, tags = [prompts[i] for i in keep], (None if tags is None else [tags[i] for i in keep])
    return prompts, tags if with_tags else None


def validation_prompts(source: str, fraction: float) -> tuple[list[str], list[str] | None]:
    """The validation split of ``source``'s prompts, with their tags where the source has them."""
    prompts, tags = prompts_and_tags(source)
    _, held = validation_split(prompts, tags, fraction)
    if not held:
        raise UserError(f"data.validation_fraction={fraction}: holds back no prompt of {source} (each task keeps "
                        "one training prompt); raise it")
    return [prompts[i] for i in held], (None if tags is None else [tags[i] for i in held])
