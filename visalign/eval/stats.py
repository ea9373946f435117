"""The statistics of paired evaluations (same prompt, same seed for both models): paired changes with their
standard errors, GenEval-style task averages, win rates and clustered standard errors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def paired_mean(diffs: Sequence[float]) -> tuple[float, float]:
    """(mean, SE) of paired differences; SE = sqrt(sample variance / n) (nan for one difference)."""
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((x - mean) ** 2 for x in diffs) / (n - 1) if n > 1 else float("nan")
    return mean, math.sqrt(var / n)


def _by_task(base: list[dict], tuned: list[dict]) -> dict[str, list[tuple[float, float]]]:
    by_key = {(r["prompt_index"], r["k"]): r for r in base}
    tasks: dict[str, list[tuple[float, float]]] = {}
    for r in tuned:
        b = by_key[(r["prompt_index"], r["k"])]
        tasks.setdefault(r["tag"], []).append((float(b["correct"]), float(r["correct"])))
    return tasks


def paired_improvement(base: list[dict], tuned: list[dict]) -> dict:
    """Overall improvement and its standard error from per-image pairs (same prompt, same seed).

    Per task: the mean of d = correct_tuned − correct_base and its SE; overall = unweighted mean
    over tasks (as GenEval's overall), SE = sqrt(Σ SE_task²)/n_tasks.
    """
    per_task = [paired_mean([t - b for b, t in pairs]) for pairs in _by_task(base, tuned).values()]
    means = [m for m, _ in per_task]
    ses = [s if s == s else 0.0 for _, s in per_task]  # a one-sample task adds no variance estimate
    delta = sum(means) / len(means)
    se = math.sqrt(sum(s * s for s in ses)) / len(ses)
    return {"delta": delta, "se": se, "z": delta / se if se > 0 else float("inf")}


def paired_by_task(base: list[dict], tuned: list[dict]) -> dict:
    """Per task: base and tuned accuracy and the paired change with its SE; overall as ``paired_improvement``."""
    out = {}
    for tag, pairs in _by_task(base, tuned).items():
        change, se = paired_mean([t - b for b, t in pairs])
        out[tag] = {"base": sum(b for b, _ in pairs) / len(pairs), "tuned": sum(t for _, t in pairs) / len(pairs),
                    "change": change, "se": se, "n": len(pairs)}
    return {"overall": paired_improvement(base, tuned), "tasks": out}


def clustered_se(values: Sequence[float], clusters: Sequence[object]) -> float:
    """SE of the mean of ``values`` when those sharing a cluster are correlated (CR1 sandwich):
    sqrt(G/(G−1) · Σ_c (Σ_{i∈c} (x_i − x̄))²) / n over G clusters.

    Held-out pairs are all pairs of a prompt's samples, so one image sits in many pairs and the pairs of
    a prompt are not independent draws; the binomial SE treats them as if they were.
    """
    n = len(values)
    mean = sum(values) / n
    sums: dict[object, float] = {}
    for x, c in zip(values, clusters):
        sums[c] = sums.get(c, 0.0) + (x - mean)
    g = len(sums)
    if g < 2:
        return float("nan")
    return math.sqrt(g / (g - 1) * sum(v * v for v in sums.values())) / n


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
        change, se = paired_mean([m[term] - b[term] for m, b in zip(model, baseline)])
        out[term] = {"model": sum(m[term] for m in model) / len(model),
                     "baseline": sum(b[term] for b in baseline) / len(baseline), "change": change, "se": se}
    return out


def win_rate_z(result: dict) -> float:
    """How many standard errors the win rate stands above 1/2."""
    return (result["win_rate"] - 0.5) / result["se"] if result["se"] > 0 else float("inf")
