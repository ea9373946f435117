"""Diffusion-KTO (Li et al. 2024): per-image desirable/undesirable labels, here derived from pairs."""

from __future__ import annotations

import torch

from ..registry import METHODS
from ..types import PreferenceBatch, StepOutput, as_float
from .base import Method, model_inputs
from .implicit import implicit_reward
from .losses import kto_loss


@METHODS.register("kto")
class KTO(Method):
    """Diffusion-KTO: winners desirable, losers undesirable; z = max(0, mean r) detached (authors' default).

    β here is the canonical −(β/2)·Δe scale: the authors' β = 1000 on (e_ref − e_θ) equals β = 2000.
    """

    def __init__(self, beta: float = 2000.0, lambda_d: float = 1.0, lambda_u: float = 1.0):
        self.beta, self.lambda_d, self.lambda_u = beta, lambda_d, lambda_u

    def __call__(self, backbone, batch: PreferenceBatch) -> StepOutput:
        x0, cond = model_inputs(backbone, batch)
        # KTO treats images independently: one t and ε per image, not per pair
        b, k = x0.shape[:2]
        noised = backbone.noise(x0.flatten(0, 1))
        cond_k = cond.repeat_interleave(k)
        err = backbone.error(noised, cond_k).view(b, k)
        with torch.no_grad(), backbone.reference():
            ref = backbone.error(noised, cond_k).view(b, k)
        r = implicit_reward(err, ref, self.beta)
        z = r.detach().mean().clamp_min(0)
        desirable = torch.zeros_like(r, dtype=torch.bool)
        desirable[:, 0] = True
        loss = kto_loss(r, desirable, z, self.lambda_d, self.lambda_u).mean()
        h = r[:, 0] - r[:, 1]
        return StepOutput(loss, {"implicit_acc": as_float((h > 0).float()), "logit_mean": as_float(h),
                                 "kl_z": as_float(z), "err_w": as_float(err[:, 0]), "err_l": as_float(err[:, 1]),
                                 "ref_err_w": as_float(ref[:, 0]), "ref_err_l": as_float(ref[:, 1])})
