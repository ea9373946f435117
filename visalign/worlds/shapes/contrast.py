"""Minimal contrast pairs: a render that satisfies a prompt and the same scene with one attribute wrong.

The near miss changes exactly one thing a text-to-image model typically gets wrong for that task
(GenEval's failure modes): the shape class, the colour, a count (one object dropped, or one added: the
shipped base over-counts more often than it under-counts), the relative
position (the two objects swap places) or the colour binding (the two objects swap colours). Both
images share layout, sizes and every other attribute, so the pair differs only in what the prompt asks.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np

from .detector import evaluate_objects
from .render import ShapeObject, clear_of, draw, scene_for
from .vocab import COLORS, SHAPES

# which edits make a near miss for each task (repeats weight the common failure)
EDITS: dict[str, tuple[str, ...]] = {
    "single_object": ("class",),
    "two_object": ("class", "drop"),
    "counting": ("add", "add", "drop", "class"),
    "colors": ("color",),
    "position": ("swap_places",),
    "color_attr": ("swap_colors", "swap_colors", "color"),
}


def edit(objects: list[ShapeObject], kind: str, rng: random.Random, size: int = 32) -> list[ShapeObject] | None:
    """One edit of a scene, or None where it does not apply (e.g. swapping colours that are equal)."""
    out = list(objects)
    i = rng.randrange(len(out))
    if kind == "class":
        out[i] = replace(out[i], shape=rng.choice([s for s in SHAPES if s != out[i].shape]))
    elif kind == "color":
        out[i] = replace(out[i], color=rng.choice([c for c in COLORS if c != out[i].color]))
    elif kind == "drop" and len(out) > 1:
        del out[i]
    elif kind == "add":
        extra = _copy_elsewhere(out[i], out, rng, size)
        if extra is None:
            return None
        out.append(extra)
    elif kind == "swap_places" and len(out) == 2:
        out = [replace(out[0], box=out[1].box), replace(out[1], box=out[0].box)]
    elif kind == "swap_colors" and len(out) == 2 and out[0].color != out[1].color:
        out = [replace(out[0], color=out[1].color), replace(out[1], color=out[0].color)]
    else:
        return None
    return out


def _copy_elsewhere(obj: ShapeObject, scene: list[ShapeObject], rng: random.Random,
                    size: int = 32, tries: int = 60) -> ShapeObject | None:
    """``obj`` again (same class, colour and size) in free space, one pixel clear of every object."""
    s = obj.box[2] - obj.box[0]
    for _ in range(tries):
        x0, y0 = rng.randint(1, size - s - 1), rng.randint(1, size - s - 1)
        box = (x0, y0, x0 + s, y0 + s)
        if clear_of(box, [o.box for o in scene]):
            return replace(obj, box=box)
    return None


def near_miss(record: dict, objects: list[ShapeObject], rng: random.Random, tries: int = 20,
              size: int = 32) -> list[ShapeObject] | None:
    """A one-edit variant of ``objects`` that fails ``record`` by GenEval's rules (None if none is found)."""
    for _ in range(tries):
        edited = edit(objects, rng.choice(EDITS[record["tag"]]), rng, size)
        if edited is not None and not evaluate_objects(edited, record)[0]:
            return edited
    return None


def contrast_pair(record: dict, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(correct render, near miss) as uint8 HWC images, fixed by ``seed``."""
    rng = random.Random(seed)
    while True:
        objects = scene_for(record, rng, size)
        wrong = near_miss(record, objects, rng, size=size)
        if wrong is not None:
            return draw(objects, size), draw(wrong, size)
