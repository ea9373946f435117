"""Implicit accuracy on held-out preference pairs: does the tuned model's implicit reward rank them right?

For a pair (w, l) the Diffusion-DPO logit h = −β/2·[(e_w − e_w_ref) − (e_l − e_l_ref)] is averaged over
several shared (t, ε) draws (a lower-variance estimate of its expectation over t and ε); the pair is
ranked right when that mean is > 0. The base model (policy = reference) has h = 0 on every pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .stats import clustered_se  # re-exported: the held-out pairs use it


def pairs_from_results(results: Sequence[dict], min_margin: float = 0.15) -> list[tuple[str, object, object]]:
    """(prompt, winner image, loser image) for every two samples of one prompt whose constraint scores
    differ by at least ``min_margin`` (results of ``generate_and_score`` with their images)."""
    by_prompt: dict[str, list[dict]] = {}
    for r in results:
        by_prompt.setdefault(r["prompt"], []).append(r)
    pairs = []
    for prompt, rows in by_prompt.items():
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                a, b = rows[i], rows[j]
                if abs(a["constraints"] - b["constraints"]) >= min_margin:
                    w, lo = (a, b) if a["constraints"] > b["constraints"] else (b, a)
                    pairs.append((prompt, w["image"], lo["image"]))
    return pairs


@torch.no_grad()
def implicit_accuracy(backbone, pairs: Sequence[tuple[str, object, object]], beta: float = 5000.0,
                      draws: int = 8, batch_size: int = 32, seed: int = 0) -> dict:
    """Share of pairs with mean h > 0 (with its binomial SE), the mean h, and the pair count."""
    from ..objectives.base import denoising_errors, model_inputs
    from ..objectives.implicit import dpo_logit
    from ..types import PreferenceBatch

    if not pairs:
        return {"accuracy": float("nan"), "se": float("nan"), "se_by_prompt": float("nan"), "mean_h": float("nan"),
                "n": 0}
    torch.manual_seed(seed)
    h_all = []
    for start in range(0, len(pairs), batch_size):
        part = pairs[start:start + batch_size]
        images = torch.stack([torch.stack([w, lo]) for _, w, lo in part]).float()
        batch = PreferenceBatch(prompts=[p for p, _, _ in part], label=torch.ones(len(part)), images=images)
        x0, cond = model_inputs(backbone, batch)
        h = 0.0
        for _ in range(draws):
            err, ref = denoising_errors(backbone, x0, cond)
            h = h + dpo_logit(err[:, 0], err[:, 1], ref[:, 0], ref[:, 1], beta).float()
        h_all.append(h / draws)
    h = torch.cat(h_all)
    right = (h > 0).float().tolist()
    acc = sum(right) / len(right)
    return {"accuracy": acc, "se": math.sqrt(acc * (1 - acc) / len(h)),
            "se_by_prompt": clustered_se(right, [p for p, _, _ in pairs]), "mean_h": float(h.mean()), "n": len(h)}


