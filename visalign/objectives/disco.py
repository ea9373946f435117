"""DisCO (Li et al. 2025) on diffusion rollouts: a discriminative objective with a KL constraint, no clipping."""

from __future__ import annotations

import torch

from ..registry import METHODS
from ..types import PreferenceBatch, StepOutput, as_float
from .base import OnlineMethod
from .policy import disco_objective
from .rollouts import GroupRollouts


@METHODS.register("disco")
class DisCO(GroupRollouts, OnlineMethod):
    """DisCO: raise the score of above-mean rollouts, lower it for below-mean ones, KL(π_old ‖ π_θ) ≤ δ.

    Score s_θ(o) = mean over trained steps of the likelihood ratio π_θ/π_old ('ratio', the authors'
    L-ratio) or of log π_θ ('log'); the constraint is the squared hinge β·max(KL − δ, 0)² with the
    authors' δ = 1e-4, β = 1e3. It shares GRPO's rollouts (same round, sampler and window).
    """

    def __init__(self, group_size: int = 16, prompts_per_round: int = 8, round_steps: int = 8, steps: int = 20,
                 eta: float = 1.0, window: int = 6, guidance: float | None = None, score: str = "ratio",
                 delta: float = 1e-4, beta: float = 1e3, shared_noise: bool = False,
                 reward: str | dict | list = "constraints", noise: str = "all", window_slide: int = 0):
        if score not in ("ratio", "log"):
            raise ValueError(f"disco.score={score!r}: expected ratio or log")
        self.configure_rollouts(group_size, prompts_per_round, round_steps, steps, eta, window, guidance,
                                shared_noise, reward, noise, window_slide)
        self.score, self.delta, self.beta = score, delta, beta
        self.adv_scale = "group"  # only the sign of Â is used: positives and negatives of each group

    def __call__(self, backbone, batch: PreferenceBatch) -> StepOutput:
        logp, logp_old, _ = self.policy_and_old(backbone, batch)
        log_ratio = logp - logp_old
        score = (torch.exp(log_ratio) if self.score == "ratio" else logp).mean(1)
        kl = (-log_ratio).mean()  # KL(π_old ‖ π_θ) estimated on π_old's own samples
        adv = batch.extras["adv"].to(logp)
        loss = disco_objective(score, adv, kl, self.delta, self.beta)
        return StepOutput(loss, {"kl": as_float(kl),
                                 "score_pos": as_float(score[adv > 0]) if (adv > 0).any() else 0.0,
                                 "score_neg": as_float(score[adv < 0]) if (adv < 0).any() else 0.0})
