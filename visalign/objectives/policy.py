"""Policy-gradient math for the online methods (GRPO, DisCO): pure tensor functions, paper symbols.

A trajectory o = (x_T, …, x_0) of a stochastic sampler has per-step Gaussian log-densities
log π_θ(x_{t−1} | x_t, c) (the per-image mean over elements, as flow_grpo and D3PO code it).
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, scale: str = "group", eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """GRPO's advantages Â_i = (r_i − mean_g r) / (std + eps) over a group g of G rollouts of one prompt.

    ``rewards`` [P, G]. ``scale`` = 'group': each group's own std (DeepSeekMath, DanceGRPO); 'batch': one
    std over the whole batch (Flow-GRPO's option, which keeps easy prompts' small gaps small). Returns
    (Â [P, G], keep [P]): a group whose rewards are all equal has no signal and is dropped.
    """
    centred = rewards - rewards.mean(1, keepdim=True)
    keep = rewards.std(1, unbiased=False) > 0
    if scale == "group":
        std = rewards.std(1, unbiased=False, keepdim=True)
    elif scale == "batch":
        std = rewards.std(unbiased=False).expand(rewards.shape[0], 1)
    else:
        raise ValueError(f"advantage scale {scale!r}: expected group or batch")
    return centred / (std + eps), keep


def clipped_surrogate(logp: Tensor, logp_old: Tensor, adv: Tensor, clip: float) -> Tensor:
    """PPO/GRPO per-step loss −min(ρ·Â, clip(ρ, 1 − ε, 1 + ε)·Â), ρ = π_θ / π_old (Schulman et al. 2017, Eq. 7)."""
    ratio = torch.exp(logp - logp_old)
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)


def k3_kl(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """Unbiased, non-negative estimate of KL(π_θ ‖ π_ref) from samples of π_θ: e^{ref − θ} − (ref − θ) − 1
    (Schulman's k3, the estimator GRPO uses)."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1


def disco_objective(score: Tensor, adv: Tensor, kl: Tensor, delta: float, beta: float) -> Tensor:
    """DisCO (Li et al. 2025): maximise E_{o+}[s_θ(o)] − E_{o−}[s_θ(o)] subject to KL(π_old ‖ π_θ) ≤ δ.

    Positives are rollouts above their group's mean reward (Â > 0), negatives below; the constraint is
    a squared-hinge penalty β·max(KL − δ, 0)². No clipping and no per-group std: nothing weighs a prompt
    by how hard it is (GRPO's difficulty bias). Returns the loss to minimise (a scalar).
    """
    pos, neg = adv > 0, adv < 0
    gap = score.new_zeros(())
    if pos.any():
        gap = gap + score[pos].mean()
    if neg.any():
        gap = gap - score[neg].mean()
    return -gap + beta * torch.clamp(kl - delta, min=0) ** 2
