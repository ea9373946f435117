"""Policy-gradient math for the online methods (GRPO, DisCO): pure tensor functions, paper symbols.

A trajectory o = (x_T, …, x_0) of a stochastic sampler has per-step Gaussian log-densities
log π_θ(x_{t−1} | x_t, c) (the per-image mean over elements, as flow_grpo and D3PO code it).
"""

from __future__ import annotations

from collections import deque

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


class PromptStats:
    """DDPO's per-prompt stat tracking (Black et al. 2023; Flow-GRPO's option): Â = (r − μ_c) / (σ_c + eps) with
    μ_c, σ_c the mean and std of the last ``buffer`` rewards of prompt c over rounds; a prompt seen fewer than
    ``min_count`` times uses the whole batch's mean and std. JSON-able state, so a resumed run continues it."""

    def __init__(self, buffer: int = 32, min_count: int = 16, eps: float = 1e-4):
        if buffer < 1 or min_count < 1:
            raise ValueError(f"per-prompt stats: buffer={buffer} and min_count={min_count} must be positive")
        self.buffer, self.min_count, self.eps = buffer, min_count, eps
        self.seen: dict[str, deque] = {}

    def advantages(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Â [N] for N rewards of ``prompts`` (this round's, added to each prompt's history first)."""
        rewards = rewards.float().flatten()
        adv = torch.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        for c in dict.fromkeys(prompts):
            idx = torch.tensor([i for i, p in enumerate(prompts) if p == c])
            hist = self.seen.setdefault(c, deque(maxlen=self.buffer))
            hist.extend(rewards[idx].tolist())
            if len(hist) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                h = torch.tensor(list(hist))
                mean, std = h.mean(), h.std(unbiased=False)
            adv[idx] = (rewards[idx] - mean) / (std + self.eps)
        return adv

    def state_dict(self) -> dict:
        return {c: list(h) for c, h in self.seen.items()}

    def load_state_dict(self, state: dict) -> None:
        self.seen = {c: deque(v, maxlen=self.buffer) for c, v in state.items()}


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
