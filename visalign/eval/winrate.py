"""Reward win-rates of model A over baseline B on paired samples (same prompt, same seed)."""

from __future__ import annotations

import math

import torch


def win_rate(scores_a: torch.Tensor, scores_b: torch.Tensor, z: float = 1.959964) -> dict:
    """Mean of w = 1[a > b] + ½·1[a = b] with a 95% normal-approximation CI from the outcomes' variance.

    Ties count half, so the interval uses the empirical variance of w (not p(1−p)); clipped to [0, 1].
    """
    if scores_a.shape != scores_b.shape:
        raise ValueError(f"win_rate: paired scores must have the same shape, got {tuple(scores_a.shape)} "
                         f"and {tuple(scores_b.shape)}")
    w = (scores_a > scores_b).double() + 0.5 * (scores_a == scores_b).double()
    n = w.numel()
    mean = float(w.mean())
    var = float(w.var(unbiased=True)) if n > 1 else 0.0
    half = z * math.sqrt(var / n) if n > 1 else float("nan")
    return {"win_rate": mean, "ci_low": max(0.0, mean - half), "ci_high": min(1.0, mean + half), "n": n,
            "wins": int((scores_a > scores_b).sum()), "ties": int((scores_a == scores_b).sum()),
            "losses": int((scores_a < scores_b).sum())}
