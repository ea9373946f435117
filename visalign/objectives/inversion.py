"""Shared step of the inversion methods (InPO, SmPO): per-image latents from inversion, ε̂ by reparametrisation."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..types import PreferenceBatch
from .base import model_inputs


def inverted_errors(backbone, batch: PreferenceBatch, steps: int, eta: float, renoise: int,
                    inversion_model: str) -> tuple[Tensor, Tensor]:
    """Policy and reference errors [B, K] on inverted latents: one grid t per pair, one ε̂ per image.

    Every image is inverted (no grad) up the ``steps`` grid to its pair's t by the current policy
    (or the reference); ε̂ = (x_t − √ᾱ_t x0)/√(1−ᾱ_t) then replaces the random ε of Diffusion-DPO.
    """
    if inversion_model not in ("policy", "reference"):
        raise ValueError(f"inversion_model={inversion_model!r}: expected policy or reference")
    x0, cond = model_inputs(backbone, batch)
    b, k = x0.shape[:2]
    flat, cond_k = x0.flatten(0, 1), cond.repeat_interleave(k)
    grid = backbone.inversion_grid(steps)
    t = grid[torch.randint(0, len(grid), (b,))].repeat_interleave(k)
    ctx = backbone.reference() if inversion_model == "reference" else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        x_inv, reached = backbone.invert(flat, cond_k, steps=steps, until=t, eta=eta, renoise=renoise)
    eps_hat = backbone.eps_from_xt(flat, x_inv, reached)
    noised = backbone.noise(flat, t=reached, eps=eps_hat)
    err = backbone.error(noised, cond_k).view(b, k)
    with torch.no_grad(), backbone.reference():
        ref = backbone.error(noised, cond_k).view(b, k)
    return err, ref
