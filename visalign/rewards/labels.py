"""Labels like a person's: Bradley-Terry choices from reward-score gaps, and the noise for a target agreement.

P(a ≻ b) = σ((r_a − r_b) / T). Pick-a-Pic's expert annotators predict a user's own choice on 68.0% of
pairs (Kirstain et al., 2023, "Pick-a-Pic", §5; PickScore reaches 70.2%): real preference labels are
that noisy, and ``temperature_for_agreement`` finds the T that makes synthetic labels as noisy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PICK_A_PIC_AGREEMENT = 0.680  # expert annotators vs the user's own choice (Kirstain et al., 2023)


def bradley_terry_labels(score_a: Tensor, score_b: Tensor, temperature: float, generator=None) -> Tensor:
    """Noisy choices like a person's: 1.0 where a is chosen, with P(a ≻ b) = σ((r_a − r_b) / T); T = 0: noiseless."""
    if temperature <= 0:
        return (score_a > score_b).float() + 0.5 * (score_a == score_b).float()
    p = torch.sigmoid((score_a - score_b) / temperature)
    return (torch.rand(p.shape, generator=generator) < p).float()


def expected_agreement(gaps: Tensor, temperature: float) -> float:
    """Expected share of pairs whose BT label matches the noiseless taste: mean of σ(|Δr| / T)."""
    return float(torch.sigmoid(gaps.abs() / temperature).mean())


def temperature_for_agreement(gaps: Tensor, agreement: float = PICK_A_PIC_AGREEMENT) -> float:
    """The T at which BT labels agree with the noiseless taste on ``agreement`` of pairs with these gaps."""
    if not 0.5 < agreement < 1.0:
        raise ValueError(f"agreement={agreement}: expected a rate in (0.5, 1)")
    lo, hi = 1e-6, 1e3
    for _ in range(100):  # agreement falls as T grows: bisect on log T
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if expected_agreement(gaps, mid) > agreement else (lo, mid)
    return math.sqrt(lo * hi)
