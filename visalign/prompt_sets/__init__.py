"""Prompt sets shipped with visalign, by name: ``--prompts geneval`` or ``--metadata geneval``.

``geneval``: GenEval's own evaluation metadata (Ghosh et al. 2023; 553 prompts over six tasks and 80 COCO
classes), MIT-licensed, its LICENSE and SOURCE.md beside it.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
NAMED: dict[str, Path] = {"geneval": HERE / "geneval" / "evaluation_metadata.jsonl"}


def named_prompt_set(name: str) -> Path | None:
    """The metadata file of a shipped prompt set, or None when ``name`` is not one."""
    return NAMED.get(name)
