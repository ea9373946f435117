"""OFS-DPO's fast-slow chasing (Qi et al. 2024, "Online DPO: Online Direct Preference Optimization with
Fast-Slow Chasing"), for on-policy Diffusion-DPO: two identical LoRA modules learn at different rates, each
from its own DPO loss, plus a regulariser that makes them chase each other.

The logits are Diffusion-DPO's h = r_w − r_l (``implicit.dpo_logit``). With the leading module F and the
chasing module S, the chasing term is DPO with S as F's reference: the frozen reference's errors cancel,

    L_FS = −log σ(h_F − h_S),

and (the min-max of the paper's regret bound) F minimises L_DPO(F) + α·L_FS while S minimises
L_DPO(S) − α·L_FS: F keeps its lead, S closes it. Each side sees the other detached. The roles are re-dealt
every few updates: the module whose DPO loss was lower over them leads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


def chasing_losses(h_fast: Tensor, h_slow: Tensor, fast_leads: bool, alpha: float) -> tuple[Tensor, Tensor]:
    """Per-pair regulariser terms (for the fast module, for the slow one): +α·L_FS for the leader, −α·L_FS
    for the chaser, L_FS = −log σ(h_F − h_S) with the other module's logit detached."""
    lead, chase = (h_fast, h_slow) if fast_leads else (h_slow, h_fast)
    for_lead = -F.logsigmoid(lead - chase.detach())
    for_chaser = F.logsigmoid(lead.detach() - chase)  # −L_FS: the chaser raises the leader's loss
    return (alpha * for_lead, alpha * for_chaser) if fast_leads else (alpha * for_chaser, alpha * for_lead)


@dataclass
class Roles:
    """Which module leads, re-dealt every ``every`` calls to the one with the lower mean DPO loss over them."""

    every: int
    fast_leads: bool = True
    sum_fast: float = 0.0
    sum_slow: float = 0.0
    count: int = 0

    def observe(self, dpo_fast: float, dpo_slow: float) -> None:
        self.sum_fast, self.sum_slow, self.count = self.sum_fast + dpo_fast, self.sum_slow + dpo_slow, self.count + 1
        if self.count >= self.every:
            self.fast_leads = self.sum_fast <= self.sum_slow
            self.sum_fast = self.sum_slow = 0.0
            self.count = 0

    def state_dict(self) -> dict:
        return {"fast_leads": self.fast_leads, "sum_fast": self.sum_fast, "sum_slow": self.sum_slow,
                "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
