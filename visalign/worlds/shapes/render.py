"""Seeded procedural ShapesWorld scenes with GenEval-template captions and metadata records."""

from __future__ import annotations

import itertools
import json
import random
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ...eval.rules import TASKS, DetectedObject, evaluate_objects, read_metadata  # noqa: F401  (re-exported)
from .vocab import BACKGROUND, COLORS, NUMBERS, PLURALS, RELATIONS, SHAPES

ShapeObject = DetectedObject  # a scene's object is what detectors return


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _with_article(*words: str) -> str:
    return f"{_article(words[0])} {' '.join(words)}"


def caption(record: dict) -> str:
    """The GenEval template sentence for a metadata record."""
    tag, inc = record["tag"], record["include"]
    if tag == "single_object":
        return f"a photo of {_with_article(inc[0]['class'])}"
    if tag == "two_object":
        return f"a photo of {_with_article(inc[0]['class'])} and {_with_article(inc[1]['class'])}"
    if tag == "counting":
        return f"a photo of {NUMBERS[inc[0]['count']]} {PLURALS[inc[0]['class']]}"
    if tag == "colors":
        return f"a photo of {_with_article(inc[0]['color'], inc[0]['class'])}"
    if tag == "position":
        rel = inc[1]["position"][0]
        return f"a photo of {_with_article(inc[1]['class'])} {rel} {_with_article(inc[0]['class'])}"
    if tag == "color_attr":
        a, b = inc
        return f"a photo of {_with_article(a['color'], a['class'])} and {_with_article(b['color'], b['class'])}"
    raise ValueError(f"unknown tag {tag!r}; expected one of {TASKS}")


def all_records() -> list[dict]:
    """Every distinct prompt of the six tasks over ShapesWorld's words, as GenEval metadata records."""
    records: list[dict] = []
    for s in SHAPES:
        records.append({"tag": "single_object", "include": [{"class": s, "count": 1}]})
    for a, b in itertools.combinations(SHAPES, 2):
        records.append({"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}]})
    for s in SHAPES:
        for n in NUMBERS:
            records.append({"tag": "counting", "include": [{"class": s, "count": n}],
                            "exclude": [{"class": s, "count": n + 1}]})
    for s in SHAPES:
        for c in COLORS:
            records.append({"tag": "colors", "include": [{"class": s, "count": 1, "color": c}]})
    for a, b in itertools.permutations(SHAPES, 2):
        for rel in RELATIONS:
            records.append({"tag": "position", "include": [
                {"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}]})
    for a, b in itertools.permutations(SHAPES, 2):
        for ca, cb in itertools.product(COLORS, COLORS):
            records.append({"tag": "color_attr", "include": [
                {"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]})
    for r in records:
        r["prompt"] = caption(r)
    return records


def split_of(prompt: str, eval_fraction: float = 0.3) -> str:
    """'train' or 'eval' for a prompt, fixed by a hash of its text so the split never drifts."""
    return "eval" if (zlib.crc32(prompt.encode()) % 1000) < eval_fraction * 1000 else "train"


def prompt_records(split: str = "all", eval_fraction: float = 0.3) -> list[dict]:
    """Records of one split. Each task keeps at least one prompt on each side, so both cover all six tasks."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    records = all_records()
    if split == "all":
        return records
    chosen = []
    for task in TASKS:
        recs = [r for r in records if r["tag"] == task]
        sides = {r["prompt"]: split_of(r["prompt"], eval_fraction) for r in recs}
        if all(v == "train" for v in sides.values()):
            sides[recs[-1]["prompt"]] = "eval"
        if all(v == "eval" for v in sides.values()):
            sides[recs[0]["prompt"]] = "train"
        chosen += [r for r in recs if sides[r["prompt"]] == split]
    return chosen


def balanced_records(split: str, per_task: int) -> list[dict]:
    """``per_task`` records for each of the six tasks, cycling through that task's prompts of ``split``.

    The splits hold very different numbers of prompts per task (3 single-object prompts in all, 216
    colour-attribution ones); cycling gives every task the same number of samples, so GenEval's
    unweighted task mean has comparable standard errors across tasks.
    """
    records = prompt_records(split)
    out = []
    for task in TASKS:
        recs = [r for r in records if r["tag"] == task]
        out += [recs[i % len(recs)] for i in range(per_task)]
    return out


def write_metadata(records: Iterable[dict], path: str | Path) -> Path:
    """Write records as GenEval's evaluation_metadata.jsonl (one JSON object per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)
    return path


# --- drawing -----------------------------------------------------------------------------------

def shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    """Boolean mask of a shape filling a w x h box (triangles point up; circles are discs)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    if shape == "square":
        return np.ones((h, w), dtype=bool)
    if shape == "circle":
        cx, cy, r = w / 2, h / 2, min(w, h) / 2
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "triangle":
        # apex at top centre, base along the bottom row
        half_width = (ys / h) * (w / 2)
        return np.abs(xs - w / 2) <= half_width + 0.25
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw(objects: list[ShapeObject], size: int = 32) -> np.ndarray:
    """Render objects onto the background as a uint8 [size, size, 3] image."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        mask = shape_mask(obj.shape, x1 - x0, y1 - y0)
        img[y0:y1, x0:x1][mask] = COLORS[obj.color]
    return img


def clear_of(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    """Whether ``box`` keeps at least a one-pixel gap to every box in ``others`` (so connected components
    stay separate)."""
    return all(box[0] > b[2] or box[2] < b[0] or box[1] > b[3] or box[3] < b[1] for b in others)


def _place(rng: random.Random, specs: list[tuple[str, str]], size: int) -> list[ShapeObject] | None:
    lo, hi = max(6, size * 7 // 32), max(8, size * 12 // 32)
    if len(specs) >= 3:
        hi = max(lo + 1, size * 10 // 32)
    placed: list[ShapeObject] = []
    for shape, color in specs:
        for _ in range(60):
            s = rng.randint(lo, hi)
            x0, y0 = rng.randint(1, size - s - 1), rng.randint(1, size - s - 1)
            box = (x0, y0, x0 + s, y0 + s)
            if clear_of(box, [p.box for p in placed]):
                placed.append(ShapeObject(shape, color, box))
                break
        else:
            return None
    return placed


def scene_for(record: dict, rng: random.Random, size: int = 32) -> list[ShapeObject]:
    """A random scene that satisfies a metadata record exactly (checked by the GenEval rules)."""
    colors = list(COLORS)
    specs: list[tuple[str, str]] = []
    for clause in record["include"]:
        for _ in range(clause["count"]):
            specs.append((clause["class"], clause.get("color") or rng.choice(colors)))
    for _ in range(500):
        objs = _place(rng, specs, size)
        if objs is not None and evaluate_objects(objs, record)[0]:
            return objs
    raise RuntimeError(f"could not place a scene for {record['prompt']!r} at size {size}")


def render(record: dict, seed: int, size: int = 32) -> tuple[np.ndarray, list[ShapeObject]]:
    """Render one image satisfying ``record`` from an integer seed; returns (uint8 HWC image, objects)."""
    rng = random.Random(seed)
    objs = scene_for(record, rng, size)
    return draw(objs, size), objs


def sample_records(n: int, seed: int, records: list[dict] | None = None,
                   task_weights: dict[str, float] | None = None) -> list[dict]:
    """n records drawn with task weights (default uniform over tasks), then uniform within a task."""
    rng = random.Random(seed)
    records = records if records is not None else all_records()
    by_task = {t: [r for r in records if r["tag"] == t] for t in TASKS}
    tasks = [t for t in TASKS if by_task[t]]
    weights = [(task_weights or {}).get(t, 1.0) for t in tasks]
    return [rng.choice(by_task[t]) for t in rng.choices(tasks, weights, k=n)]
