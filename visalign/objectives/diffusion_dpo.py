"""Diffusion-DPO (Wallace et al. 2023): pairs, shared (t, ε), logit h from policy vs reference errors."""

from __future__ import annotations

from ..registry import METHODS
from ..types import PreferenceBatch, StepOutput
from .base import Method, errors, model_inputs, pair_metrics, weighted_mean
from .implicit import dpo_logit
from .pair_heads import build_head


@METHODS.register("diffusion_dpo")
class DiffusionDPO(Method):
    """Diffusion-DPO on preference pairs; any pairwise head (sigmoid, hinge, ipo, conservative, robust, ...)."""

    def __init__(self, beta: float = 5000.0, head: str | dict = "sigmoid"):
        self.beta = beta
        self.head = build_head(head)

    def __call__(self, backbone, batch: PreferenceBatch) -> StepOutput:
        x0, cond = model_inputs(backbone, batch)
        err, ref = errors(backbone, x0, cond)
        h = dpo_logit(err[:, 0], err[:, 1], ref[:, 0], ref[:, 1], self.beta)
        loss = weighted_mean(self.head(h, batch.label.to(h)), batch.weights)
        return StepOutput(loss, pair_metrics(h, err, ref))
