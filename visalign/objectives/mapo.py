"""MaPO (Hong et al. 2024): margin-aware, reference-free preference optimisation."""

from __future__ import annotations

from ..registry import METHODS
from ..types import PreferenceBatch, StepOutput, as_float
from .base import Method, denoising_errors, model_inputs, weighted_mean
from .losses import mapo_loss


@METHODS.register("mapo")
class MaPO(Method):
    """MaPO: e_w − β log σ(T(f(e_w) − f(e_l))); no reference model (authors' β = 0.1, γ = 0.5, T = 1000)."""

    uses_reference = False

    def __init__(self, beta: float = 0.1, gamma: float = 0.5, T: float = 1000.0):
        self.beta, self.gamma, self.T = beta, gamma, T

    def __call__(self, backbone, batch: PreferenceBatch) -> StepOutput:
        x0, cond = model_inputs(backbone, batch)
        err, _ = denoising_errors(backbone, x0, cond, reference=False)
        losses = mapo_loss(err[:, 0], err[:, 1], self.beta, self.gamma, self.T)
        margin = err[:, 1] - err[:, 0]
        return StepOutput(weighted_mean(losses, batch.weights), {
            "implicit_acc": as_float((margin > 0).float()), "err_w": as_float(err[:, 0]),
            "err_l": as_float(err[:, 1])})
