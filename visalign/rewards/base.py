"""The Reward interface, its registry and weighted ensembles."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import UserError
from ..registry import REWARDS


@runtime_checkable
class Reward(Protocol):
    """Scores images against prompts: higher is better."""

    name: str
    version: str

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


def build_reward(spec) -> Reward:
    """A reward from a name, a {name, **kwargs} mapping, or a config Component."""
    if isinstance(spec, str):
        return REWARDS.build(spec)
    if isinstance(spec, dict):
        return REWARDS.build(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    return REWARDS.build(spec.name, **spec.kwargs)


class LazyReward:
    """A reward built on its first use: a method's config names it, but heavy weights (PickScore, a served
    judge) load only when the first round is scored, not when a config is checked."""

    def __init__(self, spec):
        self.spec, self._reward = spec, None

    @property
    def reward(self) -> Reward:
        if self._reward is None:
            self._reward = build_reward(self.spec)
        return self._reward

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.reward(images, prompts)


def check_prompts(reward, prompts: Sequence[str]) -> None:
    """Let a reward refuse prompts it cannot score (its optional ``check_prompts``), before any image is sampled."""
    inner = getattr(reward, "reward", reward)  # CachedReward wraps the reward it caches
    check = getattr(inner, "check_prompts", None)
    if check is not None:
        check(prompts)


def normalise(scores: Tensor, how: str) -> Tensor:
    """Per-prompt normalisation of [P, N] scores (make-dataset's ``--normalise``): 'zscore', 'rank' or 'none'."""
    if how not in ("zscore", "rank", "none"):
        raise UserError(f"normalisation {how!r}: expected zscore, rank or none")
    return rescale(scores, how)


def rescale(scores: Tensor, how: str) -> Tensor:
    """Per-row rescaling of [P, N] scores: 'zscore', 'minmax' (to [0, 1]), 'rank' (average rank in [0, 1]) or
    'none'. A row without spread maps to 0."""
    if how == "none":
        return scores
    if how == "zscore":
        std = scores.std(-1, keepdim=True, unbiased=False)
        return (scores - scores.mean(-1, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))
    if how == "minmax":
        lo, hi = scores.min(-1, keepdim=True).values, scores.max(-1, keepdim=True).values
        return (scores - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    if how == "rank":
        n = scores.shape[-1]
        less = (scores.unsqueeze(-1) > scores.unsqueeze(-2)).sum(-1).float()
        ties = (scores.unsqueeze(-1) == scores.unsqueeze(-2)).sum(-1).float() - 1
        return (less + 0.5 * ties) / max(n - 1, 1)
    raise UserError(f"rescaling {how!r}: expected zscore, minmax, rank or none")


def ensemble_scores(per_reward: dict[str, Tensor], weights: dict[str, float], how: str = "zscore") -> Tensor:
    """Weighted mean of per-prompt-normalised [P, N] scores (Syn-Pic averages its reward models)."""
    total = sum(weights.values())
    if total <= 0:
        raise UserError("reward weights must sum to a positive number")
    out = None
    for name, s in per_reward.items():
        term = weights[name] * normalise(s.float(), how)
        out = term if out is None else out + term
    return out / total


def score_and_rank(images: torch.Tensor, prompts: Sequence[str], rewards: dict, weights: dict,
                   group: int, normalise: str = "zscore") -> tuple[torch.Tensor, dict]:
    """(combined scores [P, group], each reward's raw scores) for images laid out prompt-major: every reward
    scores the batch, scores are normalised per prompt and combined by weight (Syn-Pic). make-dataset and the
    online methods both rank with it."""
    per = {n: fn(images, list(prompts)).float().view(-1, group) for n, fn in rewards.items()}
    return ensemble_scores(per, weights, normalise), per
