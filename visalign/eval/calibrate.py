"""`visalign eval calibrate-detector`: fit the open-vocabulary detector's two score thresholds on labelled images.

GenEval keeps a detection when its confidence exceeds 0.3 (0.9 for counting prompts). Those numbers were
chosen for GenEval's Mask2Former (Ghosh et al. 2023, evaluate_images.py), whose scores are calibrated
differently from OWLv2's: the google/owlv2-* model cards' own example keeps boxes above 0.1, and OWLv2's
LVIS results (Minderer et al. 2023) are AP over all scores, with no threshold. No published calibration of
OWLv2 on GenEval's classes exists, so visalign ships GenEval's numbers as the default and offers this fit
when a user has real weights and a small labelled set.

Labels: a JSON-lines file, one ``{"image": PATH, "class": NAME, "count": N}`` per (image, class), with an
optional ``"task": "presence" | "counting"`` (default: counting when N >= 2, as GenEval's counting prompts
ask for 2-4 objects). The presence threshold maximises, over the presence rows, the accuracy of "at least
one box above τ" against ``count > 0``; the counting threshold maximises, over the counting rows, the
accuracy of "exactly N boxes above τ_c". Among tied optima the middle of the longest run of best
candidates is taken, which keeps the fit away from the data's edges.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError


def _candidates(scores: Sequence[Sequence[float]]) -> list[float]:
    values = sorted({s for image in scores for s in image} | {0.0, 1.0})
    return [(a + b) / 2 for a, b in zip(values, values[1:])] or [0.5]


def _best(candidates: list[float], accuracy) -> tuple[float, float]:
    accs = [accuracy(t) for t in candidates]
    top = max(accs)
    runs, start = [], None  # runs of consecutive best candidates: take the middle of the longest
    for i, a in enumerate(accs + [None]):
        if a == top and start is None:
            start = i
        elif a != top and start is not None:
            runs.append((start, i - 1))
            start = None
    lo, hi = max(runs, key=lambda r: r[1] - r[0])
    return (candidates[lo] + candidates[hi]) / 2, top


def fit_thresholds(scores: Sequence[Sequence[float]], counts: Sequence[int],
                   counting_rows: Sequence[bool] | None = None) -> dict:
    """Presence and counting thresholds from per-(image, class) box scores and true object counts."""
    if len(scores) != len(counts) or not scores:
        raise UserError("calibrate-detector: need one list of box scores per labelled (image, class), at least one")
    counting_rows = [c >= 2 for c in counts] if counting_rows is None else list(counting_rows)
    pres = [(s, c) for s, c, k in zip(scores, counts, counting_rows) if not k]
    cnt = [(s, c) for s, c, k in zip(scores, counts, counting_rows) if k]

    def presence(t: float) -> float:
        return sum((max(s, default=0.0) > t) == (c > 0) for s, c in pres) / max(len(pres), 1)

    def counting(t: float) -> float:
        return sum(sum(x > t for x in s) == c for s, c in cnt) / max(len(cnt), 1)

    threshold, presence_acc = _best(_candidates([s for s, _ in pres]), presence) if pres else (0.3, float("nan"))
    counting_threshold, counting_acc = _best(_candidates([s for s, _ in cnt]), counting) if cnt else (0.9, float("nan"))
    return {"threshold": threshold, "counting_threshold": counting_threshold, "presence_accuracy": presence_acc,
            "counting_accuracy": counting_acc, "n": len(counts), "n_presence": len(pres), "n_counting": len(cnt),
            "geneval_defaults": {"threshold": 0.3, "counting_threshold": 0.9,
                                 "presence_accuracy": presence(0.3), "counting_accuracy": counting(0.9)}}


def read_labels(path: str | Path) -> list[dict]:
    rows = []
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--labels {path}: no such file (expected JSON lines of {{image, class, count}})")
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            count = int(row["count"])
            task = row.get("task", "counting" if count >= 2 else "presence")
            if task not in ("presence", "counting"):
                raise ValueError(task)
            rows.append({"image": str((p.parent / row["image"]) if not Path(row["image"]).is_absolute()
                                      else row["image"]), "class": str(row["class"]), "count": count, "task": task})
        except (ValueError, KeyError, TypeError):
            raise UserError(f"--labels {path}: line {i} is not {{\"image\": PATH, \"class\": NAME, \"count\": N"
                            f"[, \"task\": presence|counting]}}: "
                            f"{line[:80]!r}") from None
    if not rows:
        raise UserError(f"--labels {path}: no labelled rows")
    return rows


def calibrate(detector, labels: list[dict]) -> dict:
    """Every box score of each labelled (image, class) under ``detector`` (an OpenVocabDetector), then the fit."""
    import numpy as np
    import torch

    from ..data.pairs import decode_image

    scores = []
    for row in labels:
        arr = np.asarray(decode_image(row["image"]), dtype=np.uint8)
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0
        scores.append(detector.class_scores(image, row["class"]))
    return fit_thresholds(scores, [row["count"] for row in labels], [row["task"] == "counting" for row in labels])
