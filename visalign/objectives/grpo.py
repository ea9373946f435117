"""GRPO for diffusion (Flow-GRPO, DanceGRPO): group-relative advantages, a clipped ratio per sampler step."""

from __future__ import annotations

import torch

from ..registry import METHODS
from ..types import PreferenceBatch, StepOutput, as_float
from .base import OnlineMethod
from .policy import clipped_surrogate, k3_kl
from .rollouts import GroupRollouts


@METHODS.register("grpo")
class GRPO(GroupRollouts, OnlineMethod):
    """GRPO: G rollouts per prompt, Â = (r − mean_g) / std, clipped ratio on the early steps, optional KL.

    L = mean over trained steps and rollouts of −min(ρ_t·Â, clip(ρ_t, 1 ± ε)·Â) + λ_KL·KL_k3(π_θ ‖ π_ref),
    ρ_t = π_θ(x_{t−1} | x_t, c) / π_old(x_{t−1} | x_t, c). Defaults follow Flow-GRPO where it applies
    (group 16 here vs its 24, clip 1e-4, KL 0.04 → 0 by default, as DanceGRPO; 10-20 sampler steps with
    η = 1 for DDIM, the SDE's η 0.7 for flow models); ``window`` trains the first steps only, ``noise='window'``
    samples with η there and the ODE elsewhere and ``window_slide`` moves it (MixGRPO / Flow-GRPO-Fast; see
    ``GroupRollouts``). ``guidance=None`` samples at the run's ``train.guidance``; ``guidance=1`` trains CFG away.
    """

    def __init__(self, group_size: int = 16, prompts_per_round: int = 8, round_steps: int = 8, steps: int = 20,
                 eta: float = 1.0, window: int = 6, guidance: float | None = None, clip: float = 1e-4,
                 kl_coef: float = 0.0, adv_scale: str = "group", shared_noise: bool = False,
                 reward: str | dict | list = "constraints", noise: str = "all", window_slide: int = 0):
        self.configure_rollouts(group_size, prompts_per_round, round_steps, steps, eta, window, guidance,
                                shared_noise, reward, noise, window_slide)
        self.clip, self.kl_coef, self.adv_scale = clip, kl_coef, adv_scale

    def __call__(self, backbone, batch: PreferenceBatch) -> StepOutput:
        logp, logp_old, steps = self.policy_and_old(backbone, batch)
        adv = batch.extras["adv"].to(logp)[:, None]
        loss = clipped_surrogate(logp, logp_old, adv, self.clip).mean()
        metrics = {}
        if self.kl_coef > 0:
            kl = k3_kl(logp, self.window_logprobs(backbone, batch, steps, reference=True)).mean()
            loss = loss + self.kl_coef * kl
            metrics["kl"] = as_float(kl)
        ratio = torch.exp(logp - logp_old).detach()
        return StepOutput(loss, metrics | {
            "ratio": as_float(ratio), "clip_frac": as_float(((ratio - 1).abs() > self.clip).float()),
            "adv_abs": as_float(adv.abs())})
