"""Exact object detector for ShapesWorld pixels; GenEval's rules over its detections are eval/rules.py's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from ...eval.rules import POSITION_THRESHOLD, evaluate_objects, relative_position  # noqa: F401  (re-exported)
from ...registry import DETECTORS
from .captions import parse_caption
from .render import ShapeObject, shape_mask
from .vocab import BACKGROUND, COLORS, SHAPES

_PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)
_COLOR_NAMES = ("background", *COLORS)


@dataclass(frozen=True)
class Detection(ShapeObject):
    """A detected object: ShapeObject fields plus pixel area, centroid and how well the shape fits (IoU)."""

    area: int = 0
    centroid: tuple[float, float] = (0.0, 0.0)
    fit: float = 1.0


@dataclass(frozen=True)
class Detections:
    objects: list[Detection]
    clean: float  # in [0, 1]: foreground explained by well-fitting objects (see detect)


def to_uint8_hwc(image) -> np.ndarray:
    """Accept uint8 HWC arrays or float CHW/HWC tensors/arrays in [0, 1]."""
    arr = image.detach().float().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"expected one image with 3 dims, got shape {arr.shape}")
    if arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return arr


@lru_cache(maxsize=4096)
def _ideal(shape: str, w: int, h: int) -> np.ndarray:
    return shape_mask(shape, w, h)


def detect(image, min_area: int | None = None) -> Detections:
    """Find every object: nearest-palette colour per pixel, connected components per colour, shape by IoU.

    Components smaller than ``min_area`` (default 12 px at 32x32, scaled with image area) are blur
    or noise specks and are dropped. ``clean`` = (pixels of kept objects weighted by their shape fit)
    / (all non-background pixels): 1.0 for a clean render, lower for blobs, specks and smears.
    """
    img = to_uint8_hwc(image).astype(np.float32)
    h, w, _ = img.shape
    min_area = min_area if min_area is not None else max(4, round(12 * h * w / 1024))
    dist = ((img[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    label = dist.argmin(-1)
    objects: list[Detection] = []
    fg_total = int((label > 0).sum())
    explained = 0.0
    for ci in range(1, len(_PALETTE)):
        comps, n = ndimage.label(label == ci)
        if n == 0:
            continue
        for k, sl in enumerate(ndimage.find_objects(comps), 1):
            mask = comps[sl] == k
            area = int(mask.sum())
            if area < min_area:
                continue
            bh, bw = mask.shape
            ious = []
            for s in SHAPES:
                ideal = _ideal(s, bw, bh)
                inter = np.logical_and(ideal, mask).sum()
                ious.append(inter / np.logical_or(ideal, mask).sum())
            best = int(np.argmax(ious))
            ys, xs = np.nonzero(mask)
            y0, x0 = sl[0].start, sl[1].start
            objects.append(Detection(
                shape=SHAPES[best], color=_COLOR_NAMES[ci], box=(x0, y0, x0 + bw, y0 + bh),
                area=area, centroid=(float(xs.mean() + x0 + 0.5), float(ys.mean() + y0 + 0.5)),
                fit=float(ious[best])))
            explained += area * float(ious[best])
    objects.sort(key=lambda d: -d.area)  # GenEval takes the most confident first; here, the largest
    clean = explained / fg_total if fg_total else 0.0
    return Detections(objects, float(clean))


def score(image, record: dict) -> tuple[bool, float, float]:
    """(GenEval-correct, fraction of constraints met, clean term) for one image."""
    det = detect(image)
    correct, frac, _ = evaluate_objects(det.objects, record)
    return correct, frac, det.clean


# Continuous reward: constraints dominate; the clean term only breaks ties between equally correct images.
CLEAN_WEIGHT = 0.1


def shapes_reward_value(image, record: dict) -> float:
    """Reward in [0, 1]: 0.9 x fraction of the record's constraints met + 0.1 x clean."""
    _, frac, clean = score(image, record)
    return (1.0 - CLEAN_WEIGHT) * frac + CLEAN_WEIGHT * clean


def record_for_prompt(prompt: str) -> dict:
    """The metadata record a ShapesWorld caption describes (any GenEval template wording; see captions.py)."""
    return parse_caption(prompt)


@DETECTORS.register("shapes")
class ShapesDetector:
    """ShapesWorld's exact detector as a GenEval detector: every class must be one of its shapes."""

    name = "shapes-exact"

    def check_records(self, records: Sequence[dict], source: str | None = None) -> None:
        """Every class must be a ShapesWorld shape; checked before any model loads."""
        from ...errors import UserError

        where = f"--metadata {source}: " if source else ""
        for i, r in enumerate(records):
            for clause in r.get("include", []) + r.get("exclude", []):
                if clause["class"] not in SHAPES:
                    raise UserError(f"{where}record {i} ({r['prompt']!r}): class {clause['class']!r} is not a "
                                    f"ShapesWorld shape ({', '.join(SHAPES)}); real-model classes need the "
                                    "open-vocabulary detector (--detector owlv2)")

    def objects(self, image, record: dict) -> list[Detection]:
        return detect(image).objects
