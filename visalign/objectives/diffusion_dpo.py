"""Diffusion-DPO (Wallace et al. 2023): pairs, shared (t, ε), logit h from policy vs reference errors."""

from __future__ import annotations

from ..registry import METHODS
from ..types import PreferenceBatch, StepOutput
from .base import Method, denoising_errors, model_inputs, pair_metrics, weighted_mean
from .implicit import implicit_reward
from .pair_heads import build_head


@METHODS.register("diffusion_dpo")
class DiffusionDPO(Method):
    """Diffusion-DPO on preference pairs; any pairwise head (sigmoid, hinge, ipo, robust, fdpo, adpo, beta_dpo, ...)."""

    def __init__(self, beta: float = 5000.0, head: str | dict = "sigmoid"):
        self.beta = beta
        self.head = build_head(head)

    def __call__(self, backbone, batch: PreferenceBatch) -> StepOutput:
        x0, cond = model_inputs(backbone, batch)
        err, ref = denoising_errors(backbone, x0, cond)
        r = implicit_reward(err, ref, self.beta)  # r_w − r_l is Diffusion-DPO's logit h (Eq. 14 inside σ)
        losses = self.head.pair_loss(r[:, 0], r[:, 1], batch.label.to(r), batch.scores)
        return StepOutput(weighted_mean(losses, batch.weights), pair_metrics(r[:, 0] - r[:, 1], err, ref)
                          | self.head.metrics())

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state.get("head", {}))
