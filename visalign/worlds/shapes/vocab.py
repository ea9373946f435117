"""ShapesWorld's closed vocabulary: shape classes, colours, relations and caption words."""

from __future__ import annotations

from ...eval.rules import TASKS  # noqa: F401  (GenEval's task tags, re-exported for the world's users)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
# GenEval's colour names; RGB values far apart so a nearest-palette rule is exact on clean renders.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 30),
    "purple": (140, 50, 185),
    "orange": (245, 135, 25),
}
BACKGROUND: tuple[int, int, int] = (238, 238, 232)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: dict[int, str] = {2: "two", 3: "three", 4: "four"}


def caption_words() -> list[str]:
    """Every word a ShapesWorld caption can contain, in a fixed order (the tokenizer's vocabulary)."""
    words = ["a", "an", "photo", "of", "and"]
    words += list(SHAPES) + list(PLURALS.values()) + list(COLORS) + list(NUMBERS.values())
    for rel in RELATIONS:
        words += rel.split()
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)
