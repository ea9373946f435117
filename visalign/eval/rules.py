"""GenEval's metadata format and its scoring rules over detected objects (Ghosh et al. 2023,
``evaluation/evaluate_images.py``), for any detector: ShapesWorld's exact one, or OWLv2 with a CLIP colour
classifier for real models."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError, read_text

# GenEval's tasks, in its order
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# GenEval's relative-position margin: offsets smaller than 0.1 x (sum of box sizes) do not count.
POSITION_THRESHOLD = 0.1


@dataclass(frozen=True)
class DetectedObject:
    """One object: its class, colour and bounding box (x0, y0, x1, y1), end-exclusive."""

    shape: str
    color: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)


def relative_position(a: DetectedObject, b: DetectedObject) -> set[str]:
    """Relations of a to b from box-centre offsets less a margin, as GenEval decides them."""
    ca, cb = np.array(a.center), np.array(b.center)
    dim_a = np.array([a.box[2] - a.box[0], a.box[3] - a.box[1]], dtype=np.float64)
    dim_b = np.array([b.box[2] - b.box[0], b.box[3] - b.box[1]], dtype=np.float64)
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def evaluate_objects(objects: Sequence[DetectedObject], record: dict) -> tuple[bool, float, list[str]]:
    """GenEval's rules on a list of objects (most confident first).

    Returns (correct, fraction of constraints met, reasons for failures). Constraints: per include
    clause its count, its colour and its position when given; per exclude clause its absence.
    """
    by_class: dict[str, list[DetectedObject]] = {}
    for o in objects:
        by_class.setdefault(o.shape, []).append(o)
    met = total = 0
    reasons: list[str] = []
    matched: list[list[DetectedObject] | None] = []
    for req in record.get("include", []):
        cls, count = req["class"], req["count"]
        found = by_class.get(cls, [])[:count]
        ok = len(found) >= count
        total += 1
        met += ok
        if not ok:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        if "color" in req:
            total += 1
            n_color = sum(o.color == req["color"] for o in found)
            color_ok = ok and n_color >= count
            met += color_ok
            if ok and not color_ok:
                reasons.append(f"expected {req['color']} {cls}>={count}, found {n_color}")
            ok = ok and color_ok
        if "position" in req:
            total += 1
            rel, target = req["position"]
            targets = matched[target] if target < len(matched) else None
            pos_ok = False
            if ok and targets is None:
                reasons.append(f"no target for {cls} to be {rel}")
            elif ok:
                pos_ok = all(rel in relative_position(o, t) for o in found for t in targets)
                if not pos_ok:
                    reasons.append(f"expected {cls} {rel} target")
            met += pos_ok
            ok = ok and pos_ok
        matched.append(found if ok else None)
    for req in record.get("exclude", []):
        total += 1
        n = len(by_class.get(req["class"], []))
        if n >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
        else:
            met += 1
    return not reasons, (met / total if total else 1.0), reasons


def read_metadata(path: str | Path) -> list[dict]:
    """GenEval metadata records: a world's split (``shapes:eval``, from ``METADATA_SOURCES``), a named prompt
    set (``geneval``) or a metadata file, naming the file and line of any malformed record."""
    from ..prompt_sets import named_prompt_set
    from ..registry import METADATA_SOURCES

    scheme, _, spec = str(path).partition(":")
    if spec and scheme in METADATA_SOURCES and not Path(str(path)).exists():
        return METADATA_SOURCES.get(scheme)(spec, "--metadata")
    path = named_prompt_set(str(path)) or path
    records = []
    for i, line in enumerate(read_text(path, "--metadata").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        problem = _record_problem(r)
        if problem:
            raise UserError(f"{path}:{i}: {problem} (GenEval metadata format)")
        records.append(r)
    if not records:
        raise UserError(f"{path}: holds no records (GenEval metadata: one JSON object per line)")
    return records


def _record_problem(r) -> str:
    if not isinstance(r, dict):
        return "expected a JSON object"
    for key in ("tag", "prompt", "include"):
        if key not in r:
            return f"record lacks the field {key!r}"
    for clause in list(r["include"]) + list(r.get("exclude", [])):
        if not isinstance(clause, dict) or not isinstance(clause.get("class"), str) \
                or not isinstance(clause.get("count"), int):
            return f"each include/exclude clause needs a text 'class' and a whole 'count', got {clause!r}"
    return ""
