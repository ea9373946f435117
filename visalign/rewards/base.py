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
    """Per-prompt normalisation of [P, N] scores: 'zscore', 'rank' (average rank in [0, 1]) or 'none'."""
    if how == "none":
        return scores
    if how == "zscore":
        std = scores.std(-1, keepdim=True, unbiased=False)
        return (scores - scores.mean(-1, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))
    if how == "rank":
        n = scores.shape[-1]
        less = (scores.unsqueeze(-1) > scores.unsqueeze(-2)).sum(-1).float()
        ties = (scores.unsqueeze(-1) == scores.unsqueeze(-2)).sum(-1).float() - 1
        return (less + 0.5 * ties) / max(n - 1, 1)
    raise UserError(f"normalisation {how!r}: expected zscore, rank or none")


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
