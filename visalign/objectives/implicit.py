"""Implicit rewards of a diffusion policy against its reference (Diffusion-DPO, Wallace et al. 2023)."""

from __future__ import annotations

from torch import Tensor


def implicit_reward(err: Tensor, ref_err: Tensor, beta: float) -> Tensor:
    """r = -(β/2)·(e_θ − e_ref): per-image implicit reward from mean denoising errors (DPO Eq. 14, mean form)."""
    return -0.5 * beta * (err - ref_err)


def dpo_logit(err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, beta: float) -> Tensor:
    """h = −(β/2)·[(e_θ,w − e_ref,w) − (e_θ,l − e_ref,l)] = r_w − r_l (Diffusion-DPO Eq. 14 inside σ)."""
    return implicit_reward(err_w, ref_err_w, beta) - implicit_reward(err_l, ref_err_l, beta)
