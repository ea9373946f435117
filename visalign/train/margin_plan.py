"""Data-side options of the loop: per-pair weights and curriculum order from score margins."""

from __future__ import annotations

import numpy as np
import torch

from ..config import RunConfig
from ..data.pairs import DataError
from ..objectives.margins import curriculum_order, curriculum_stages, difficulty_weights, margin_weights


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
    """Curriculum (Curry-DPO) in one stage: easy to hard by score margin, else None (shuffled epochs)."""
    if not cfg.data.curriculum or cfg.data.curriculum_stages > 1:
        return None
    return curriculum_order(dataset.margins()).numpy()


def stage_steps(cfg: RunConfig) -> int:
    """Optimizer steps per Curry-DPO stage (the last stage may be shorter)."""
    return -(-cfg.train.steps // cfg.data.curriculum_stages)


def pair_stages(cfg: RunConfig, dataset) -> list[np.ndarray] | None:
    """Curry-DPO's stages: the easy-to-hard order in ``data.curriculum_stages`` chunks, else None."""
    if not cfg.data.curriculum or cfg.data.curriculum_stages <= 1:
        return None
    return [c.numpy() for c in curriculum_stages(dataset.margins(), cfg.data.curriculum_stages)]


def reference_resets(cfg: RunConfig) -> set[int]:
    """Steps at whose start the reference becomes the current policy: each Curry-DPO stage after the first."""
    if not cfg.data.curriculum or cfg.data.curriculum_stages <= 1:
        return set()
    per = stage_steps(cfg)
    return {s * per for s in range(1, cfg.data.curriculum_stages) if s * per < cfg.train.steps}
