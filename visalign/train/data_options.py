"""Data-side options of the loop: per-pair weights and curriculum order from score margins."""

from __future__ import annotations

import numpy as np
import torch

from ..config import RunConfig
from ..data.pairs import DataError
from ..objectives.weights import curriculum_order, difficulty_weights, margin_weights


def pair_weights(cfg: RunConfig, batch) -> torch.Tensor | None:
    how = cfg.data.weighting
    if how == "none":
        return None
    if batch.scores is None:
        raise DataError(f"data.weighting={how} needs score_0/score_1 columns in the pairs data")
    margin = batch.scores[:, 0] - batch.scores[:, 1]
    fn = margin_weights if how == "margin" else difficulty_weights
    return fn(margin, cfg.data.weight_scale)


def pair_order(cfg: RunConfig, dataset) -> np.ndarray | None:
    """Curriculum (Curry-DPO): easy to hard by score margin, else None (shuffled epochs)."""
    if not cfg.data.curriculum:
        return None
    return curriculum_order(dataset.margins()).numpy()
