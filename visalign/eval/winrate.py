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
    se = math.sqrt(var / n) if n > 1 else float("nan")
    return {"win_rate": mean, "se": se, "ci_low": max(0.0, mean - half), "ci_high": min(1.0, mean + half), "n": n,
            "wins": int((scores_a > scores_b).sum()), "ties": int((scores_a == scores_b).sum()),
            "losses": int((scores_a < scores_b).sum())}


def paired_term_changes(model: list[dict], baseline: list[dict]) -> dict:
    """Per named reward term: both means and the paired change (same prompt and seed) with its SE."""
    out = {}
    for term in model[0]:
        d = [m[term] - b[term] for m, b in zip(model, baseline)]
        mean = sum(d) / len(d)
        var = sum((x - mean) ** 2 for x in d) / (len(d) - 1) if len(d) > 1 else float("nan")
        out[term] = {"model": sum(m[term] for m in model) / len(model),
                     "baseline": sum(b[term] for b in baseline) / len(baseline),
                     "change": mean, "se": math.sqrt(var / len(d))}
    return out


def win_rate_z(result: dict) -> float:
    """How many standard errors the win rate stands above 1/2."""
    return (result["win_rate"] - 0.5) / result["se"] if result["se"] > 0 else float("inf")
