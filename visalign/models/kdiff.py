"""k-Diff (Jin & Wang 2026): one prediction target with a parameter k, of which ε, v and x are special cases.

With x_t = α x0 + σ ε (α = √ᾱ_t, σ = √(1−ᾱ_t), so α = cos φ_t and σ = sin φ_t), every target the network
can output is a direction in the (ε, −x0) plane:

    y_k = cos θ · ε − sin θ · x0,   θ = k·φ_t for k ∈ [0, 1],   θ = φ_t + (k − 1)(π/2 − φ_t) for k ∈ [1, 2]

so k = 0 is ε-prediction, k = 1 is v-prediction (α ε − σ x0, Salimans & Ho) and k = 2 is x-prediction (−x0:
the family is one rotation, so the sign is part of it). Given x_t, the output determines both x̂0 and ε̂:

    x̂0 = (cos θ · x_t − σ · y) / D,   ε̂ = (sin θ · x_t + α · y) / D,   D = cos(φ_t − θ)

The loss is measured in one space for every k (v-space, ‖v̂ − v‖² = ‖ŷ − y‖² / D² with v̂ = α ε̂ − σ x̂0), so
k changes what the network outputs, not how errors are weighed, and a learned k (``LearnedK``) moves towards
the output the network predicts best. The paper's own parameterisation was not available offline; this family has the
properties its abstract states (ε, v and x as special cases, k learned from data) and is tested for them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

K_MAX = 2.0
# D → 0 only where a target cannot identify v (ε-prediction at pure noise, x-prediction at zero noise). Sampling
# divides exactly (as diffusers' own ε or x steps do, then clips); the training loss caps the v-space weight
# 1/D² at 1/TRAIN_MIN_DET² = 100 there, as min-SNR weighting caps its weights, so no timestep dominates.
EXACT_MIN_DET = 1e-12
TRAIN_MIN_DET = 0.1


def _expand(v: Tensor, like: Tensor) -> Tensor:
    # the schedule's ᾱ may live on the CPU and the batch on a GPU: move it to the batch
    return v.view(-1, *([1] * (like.ndim - 1))).to(like.device, like.dtype)


def target_angle(alpha_bar: Tensor, k: Tensor | float) -> tuple[Tensor, Tensor]:
    """(φ_t, θ_k(φ_t)) for ᾱ_t [B]: the noise angle and the target's angle."""
    phi = torch.atan2((1 - alpha_bar).clamp_min(0).sqrt(), alpha_bar.sqrt())
    k = torch.as_tensor(k, dtype=phi.dtype, device=phi.device)
    # no clamp inside the branches: at k = 1 (a learned k's usual start) the gradient must not vanish
    low, high = k * phi, phi + (k - 1) * (math.pi / 2 - phi)
    return phi, torch.where(k <= 1, low, high)


def k_target(x0: Tensor, eps: Tensor, alpha_bar: Tensor, k: Tensor | float) -> Tensor:
    """y_k = cos θ ε − sin θ x0: what a k-parameterised network outputs."""
    _, theta = target_angle(alpha_bar, k)
    return _expand(theta.cos(), eps) * eps - _expand(theta.sin(), x0) * x0


def k_split(y: Tensor, x_t: Tensor, alpha_bar: Tensor, k: Tensor | float,
            min_det: float = EXACT_MIN_DET) -> tuple[Tensor, Tensor]:
    """(x̂0, ε̂) from a k-parameterised output y and x_t (the 2x2 system above, D at least ``min_det``)."""
    phi, theta = target_angle(alpha_bar, k)
    a, s = _expand(phi.cos(), x_t), _expand(phi.sin(), x_t)
    c, n = _expand(theta.cos(), x_t), _expand(theta.sin(), x_t)
    det = _expand(determinant(alpha_bar, k, min_det), x_t)
    return (c * x_t - s * y) / det, (n * x_t + a * y) / det


def determinant(alpha_bar: Tensor, k: Tensor | float, min_det: float = EXACT_MIN_DET) -> Tensor:
    """D = cos(φ_t − θ_k) [B], at least ``min_det``: v̂ − v = (ŷ − y) / D, so the v-space weight is 1/D²."""
    phi, theta = target_angle(alpha_bar, k)
    return (phi - theta).cos().clamp_min(min_det)


def velocity_error(y_hat: Tensor, y: Tensor, alpha_bar: Tensor, k: Tensor | float) -> Tensor:
    """Per-image ‖v̂ − v‖² (mean over elements) of a k-output ŷ against the target y = y_k: since x̂0 and ε̂ are
    linear in ŷ given x_t, v̂ − v = (ŷ − y) / D exactly; the weight 1/D² is capped at 1/TRAIN_MIN_DET²."""
    det = determinant(alpha_bar, k, TRAIN_MIN_DET)
    return ((y_hat.float() - y.float()) ** 2).flatten(1).mean(1) / det.float() ** 2


class LearnedK(torch.nn.Module):
    """k = K_MAX · σ(κ), a scalar learned with the network (initialised at ``k``)."""

    def __init__(self, k: float = 1.0):
        super().__init__()
        p = min(max(k / K_MAX, 1e-4), 1 - 1e-4)
        self.logit = torch.nn.Parameter(torch.tensor(math.log(p / (1 - p))))

    def forward(self) -> Tensor:
        return K_MAX * torch.sigmoid(self.logit)
