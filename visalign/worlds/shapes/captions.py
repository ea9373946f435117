"""GenEval's caption templates over ShapesWorld's words, parsed back into metadata records.

Accepts what a person writes in those templates, not only the 273 captions the world enumerates:
either order of two objects, ``a``/``an``/``one``/``the`` or no article, an optional ``a photo of``,
any case, a final full stop, plural nouns and counts as words or digits. Anything else is refused
with the reason, before a single image is sampled.
"""

from __future__ import annotations

import copy
import functools
import re

from ...errors import UserError
from .vocab import COLORS, PLURALS, RELATIONS, SHAPES

_NUMBER_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_ARTICLES = ("a", "an", "one", "the")
_SINGULAR = {p: s for s, p in PLURALS.items()}


class CaptionError(UserError):
    """Text outside GenEval's templates over ShapesWorld's shapes, colours, counts and relations."""


def _object(words: list[str]) -> dict:
    """``[article] [colour] shape`` -> {class, count 1, optional colour}."""
    if words and words[0] in _ARTICLES:
        words = words[1:]
    if len(words) == 2 and words[0] in COLORS and words[1] in SHAPES:
        return {"class": words[1], "count": 1, "color": words[0]}
    if len(words) == 1 and words[0] in SHAPES:
        return {"class": words[0], "count": 1}
    raise CaptionError("expected '[a|an] [colour] shape' with a shape in "
                       f"{', '.join(SHAPES)} and a colour in {', '.join(COLORS)}, got {' '.join(words)!r}")


def _count(words: list[str]) -> dict | None:
    """``two circles`` / ``3 squares`` -> a counting record, else None."""
    if len(words) != 2 or words[1] not in _SINGULAR:
        return None
    n = int(words[0]) if words[0].isdigit() else _NUMBER_WORDS.get(words[0])
    if n is None or n < 2:
        return None
    shape = _SINGULAR[words[1]]
    return {"tag": "counting", "include": [{"class": shape, "count": n}], "exclude": [{"class": shape, "count": n + 1}]}


def _split_relation(words: list[str]) -> tuple[list[str], str, list[str]] | None:
    for rel in RELATIONS:
        r = rel.split()
        for i in range(1, len(words) - len(r)):
            if words[i:i + len(r)] == r:
                return words[:i], rel, words[i + len(r):]
    return None


def _record(words: list[str]) -> dict:
    counted = _count(words)
    if counted:
        return counted
    if "and" in words:
        i = words.index("and")
        a, b = _object(words[:i]), _object(words[i + 1:])
        if a["class"] == b["class"] and a.get("color") == b.get("color"):
            raise CaptionError(f"two identical objects: write 'two {PLURALS[a['class']]}' instead")
        colored = ("color" in a, "color" in b)
        if colored == (True, True):
            return {"tag": "color_attr", "include": [a, b]}
        if colored == (False, False):
            return {"tag": "two_object", "include": [a, b]}
        raise CaptionError("give both objects a colour or neither (GenEval's two_object / color_attr templates)")
    parts = _split_relation(words)
    if parts:
        a, rel, b = _object(parts[0]), parts[1], _object(parts[2])
        if "color" in a or "color" in b:
            raise CaptionError("position captions name shapes without colours (GenEval's position template)")
        return {"tag": "position", "include": [b, {**a, "position": [rel, 0]}]}
    obj = _object(words)
    return {"tag": "colors" if "color" in obj else "single_object", "include": [obj]}


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> dict:
    words = re.sub(r"[.!]+$", "", text.strip().lower()).replace(",", " ").split()
    if words[:3] == ["a", "photo", "of"]:
        words = words[3:]
    if not words:
        raise CaptionError("nothing after 'a photo of'")
    return _record(words)


def parse_caption(text: str) -> dict:
    """The GenEval metadata record (tag, include, exclude, prompt) that ``text`` describes in ShapesWorld."""
    try:
        record = _parse(text)
    except CaptionError as e:
        raise CaptionError(f"prompt {text!r} is not a ShapesWorld caption: {e}") from None
    return {**copy.deepcopy(record), "prompt": text}


def check_captions(prompts, what: str = "prompt") -> None:
    """Raise a CaptionError naming the first prompt outside the templates (call before sampling)."""
    for i, p in enumerate(prompts):
        try:
            parse_caption(p)
        except CaptionError as e:
            raise CaptionError(f"{what} {i}: {e}") from None
