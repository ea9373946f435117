"""The Reward interface, its registry and weighted ensembles."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..config import Component
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
    judge) load only when the first round is scored, not when a config is checked.

    ``spec`` is one reward (a name, or ``{name, **kwargs}``) or a weighted sum of several: a mapping
    ``{name: weight}`` or a list of ``{name, weight, **kwargs}``. The sum is not renormalised, so a term of
    weight w adds exactly w x its score (a charge per unrequested object stays that charge); ``terms`` holds each
    reward's scores from the last call, for the round's log. Non-finite scores are refused where they enter.
    """

    def __init__(self, spec):
        self.parts = reward_parts(spec)
        self._built: list | None = None
        self.terms: dict[str, Tensor] = {}

    @property
    def name(self) -> str:
        """The reward's name, or its terms' joined by '+' (known without building anything)."""
        return "+".join(label for label, _, _ in self.parts)

    @property
    def reward(self) -> Reward:
        """The one reward of a single-reward spec (what ``check_prompts`` asks)."""
        return self._rewards()[0][2]

    def _rewards(self) -> list:
        if self._built is None:
            self._built = [(label, weight, build_reward(spec)) for label, spec, weight in self.parts]
        return self._built

    def check_prompts(self, prompts: Sequence[str]) -> None:
        for _, _, fn in self._rewards():
            check_prompts(fn, prompts)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        total, self.terms = None, {}
        for label, weight, fn in self._rewards():
            scores = fn(images, prompts).float().cpu()
            if not bool(torch.isfinite(scores).all()):
                bad = int((~torch.isfinite(scores)).sum())
                raise UserError(f"reward {label!r} returned {bad} non-finite score(s) of {len(scores)}; a reward "
                                "must return finite numbers (fix the reward or its server)")
            self.terms[label] = scores
            total = weight * scores if total is None else total + weight * scores
        return total

    def term_means(self) -> dict[str, float]:
        """Each reward's mean over the last call, as ``reward_<name>`` (logged per round when there are several)."""
        if len(self.terms) < 2:
            return {}
        return {f"reward_{label}": float(s.mean()) for label, s in self.terms.items()}


def reward_parts(spec) -> list[tuple[str, object, float]]:
    """(label, single-reward spec, weight) for each term of a reward spec (see ``LazyReward``)."""
    if isinstance(spec, (str, Component)) or (isinstance(spec, dict) and "name" in spec):
        name = spec if isinstance(spec, str) else (spec.name if isinstance(spec, Component) else spec["name"])
        return [(str(name), spec, 1.0)]
    if isinstance(spec, dict):
        items = [{"name": k, "weight": v} for k, v in spec.items()]
    elif isinstance(spec, (list, tuple)):
        items = [dict(x) if isinstance(x, dict) else {"name": x, "weight": 1.0} for x in spec]
    else:
        raise UserError(f"reward {spec!r}: expected a name, {{name, ...}}, {{name: weight}} or a list of "
                        "{name, weight, ...}")
    out = []
    for item in items:
        if "name" not in item:
            raise UserError(f"reward ensemble entry {item!r}: needs a 'name'")
        weight = item.pop("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight != weight:
            raise UserError(f"reward {item['name']!r}: weight {weight!r} is not a number")
        label = str(item["name"])
        label = label if label not in [o[0] for o in out] else f"{label}_{len(out)}"
        out.append((label, item if len(item) > 1 else item["name"], float(weight)))
    if not out:
        raise UserError("reward ensemble is empty: name at least one reward")
    return out


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
