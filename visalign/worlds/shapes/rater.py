"""ShapesWorld's rater: a stated, human-like taste, registered as the reward ``rater``.

A person asked "which picture do you prefer?" rewards prompt-following first, then look. The rater
scores both, from the exact detector, over attributes the shipped base already varies in its samples
(nothing is added to the world, so nothing is built to be easy):

    r(x, c) = w_p·P(x, c) + w_s·S(x) + w_m·M(x) + w_k·K(x) + w_c·C(x)            (weights sum to 1)

- P: the fraction of the caption's GenEval constraints met (counts, colours, positions);
- S (size): mean object side √area / H, mapped linearly from [7/32, 11/32] (the renderer's range) to [0, 1];
- M (margins): the smallest gap between any object and the image edge, / (H/8), capped at 1;
- K (crispness): the detector's ``clean`` term (foreground explained by well-fitting shapes);
- C (composition): 1 − distance of the objects' joint centre from the image centre / (H/2).

No single pixel statistic separates it: S rewards big objects, M penalises objects that grow into the
edges, C moves them to the middle, and P cares only about what is drawn. An image with no object scores
0 on every look term.

Labelling like a person: ``rewards.labels.bradley_terry_labels`` turns score gaps into noisy choices,
P(a ≻ b) = σ((r_a − r_b) / T). Pick-a-Pic's expert annotators predict a user's choice on 68.0% of
pairs (Kirstain et al., 2023, "Pick-a-Pic", §5; PickScore: 70.2%); ``temperature_for_agreement`` finds
the T at which the labels agree with the noiseless taste at a chosen rate on given pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ...registry import REWARDS
from .captions import check_captions
from .detector import Detections, detect, evaluate_objects, record_for_prompt

SIZE_RANGE = (7 / 32, 11 / 32)  # the renderer's object sides as a fraction of the image side


def size_term(det: Detections, side: int) -> float:
    """S: mean √area / side, mapped from the renderer's range of sizes to [0, 1]."""
    if not det.objects:
        return 0.0
    mean_side = float(np.mean([math.sqrt(o.area) for o in det.objects])) / side
    lo, hi = SIZE_RANGE
    return float(np.clip((mean_side - lo) / (hi - lo), 0.0, 1.0))


def margin_term(det: Detections, side: int) -> float:
    """M: the smallest object-to-edge gap in pixels / (side / 8), capped at 1."""
    if not det.objects:
        return 0.0
    gap = min(min(x0, y0, side - x1, side - y1) for x0, y0, x1, y1 in (o.box for o in det.objects))
    return float(min(max(gap, 0) / (side / 8), 1.0))


def composition_term(det: Detections, side: int) -> float:
    """C: 1 − |joint centre − image centre| / (side / 2), area-weighted over the objects."""
    if not det.objects:
        return 0.0
    w = np.array([o.area for o in det.objects], dtype=np.float64)
    c = np.array([o.centroid for o in det.objects], dtype=np.float64)
    centre = (w[:, None] * c).sum(0) / w.sum()
    return float(max(1.0 - np.linalg.norm(centre - side / 2) / (side / 2), 0.0))


@REWARDS.register("rater")
class RaterReward:
    """ShapesWorld's human-like rater: prompt-following plus a stated taste (size, margins, crispness, centring)."""

    name = "rater"
    version = "1"

    def __init__(self, prompt: float = 0.5, size: float = 0.2, margin: float = 0.1, crisp: float = 0.1,
                 centre: float = 0.1):
        self.weights = {"prompt": prompt, "size": size, "margin": margin, "crisp": crisp, "centre": centre}
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            from ...errors import UserError

            raise UserError(f"reward rater: weights must be >= 0 with a positive sum, got {self.weights}")

    def check_prompts(self, prompts: Sequence[str]) -> None:
        check_captions(prompts)

    def terms(self, image, prompt: str) -> dict[str, float]:
        """Each term of r(x, c) for one image, in [0, 1]."""
        det = detect(image)
        side = int(image.shape[-1])
        _, frac, _ = evaluate_objects(det.objects, record_for_prompt(prompt))
        return {"prompt": frac, "size": size_term(det, side), "margin": margin_term(det, side),
                "crisp": det.clean if det.objects else 0.0, "centre": composition_term(det, side)}

    def combine(self, terms: dict[str, float]) -> float:
        """r(x, c) from its terms: the stated weighted mean."""
        return sum(self.weights[k] * terms[k] for k in terms) / sum(self.weights.values())

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return torch.tensor([self.combine(self.terms(img, p)) for img, p in zip(images, prompts)],
                            dtype=torch.float32)
