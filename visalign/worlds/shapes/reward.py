"""The exact ShapesWorld reward, registered as ``shapes``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ...registry import REWARDS
from .captions import check_captions
from .detector import detect, evaluate_objects, record_for_prompt, shapes_reward_value


@REWARDS.register("shapes")
class ShapesReward:
    """ShapesWorld: 0.9 × fraction of the prompt's GenEval constraints met + 0.1 × clean-image term."""

    name = "shapes"
    version = "1"

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Refuse text outside GenEval's templates over ShapesWorld's words before any image is sampled."""
        check_captions(prompts)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"shapes reward: {len(images)} images but {len(prompts)} prompts")
        vals = [shapes_reward_value(img, record_for_prompt(p)) for img, p in zip(images, prompts)]
        return torch.tensor(vals, dtype=torch.float32)


class _RuleReward:
    """GenEval's rules alone (no cleanliness term): the exact signal for online RL."""

    version = "1"

    def check_prompts(self, prompts: Sequence[str]) -> None:
        check_captions(prompts)

    def _verdicts(self, images: Tensor, prompts: Sequence[str]) -> list[tuple[bool, float]]:
        if len(images) != len(prompts):
            raise ValueError(f"{self.name} reward: {len(images)} images but {len(prompts)} prompts")
        return [evaluate_objects(detect(img).objects, record_for_prompt(p))[:2] for img, p in zip(images, prompts)]


@REWARDS.register("constraints")
class ConstraintsReward(_RuleReward):
    """ShapesWorld: the fraction of the prompt's GenEval constraints met (counts, colours, positions), in [0, 1]."""

    name = "constraints"

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return torch.tensor([frac for _, frac in self._verdicts(images, prompts)], dtype=torch.float32)


@REWARDS.register("geneval")
class GenEvalReward(_RuleReward):
    """ShapesWorld: 1 if the image is GenEval-correct for its prompt, else 0 (the binary reward of DanceGRPO)."""

    name = "geneval"

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return torch.tensor([float(ok) for ok, _ in self._verdicts(images, prompts)], dtype=torch.float32)


def unrequested_objects(objects, record: dict) -> int:
    """Objects the prompt does not ask for: per class, those beyond the include clauses' counts of that class
    (any colour), plus every object of a class it does not name. ``len(objects) − Σ_c min(n_c, asked_c)``."""
    asked: dict[str, int] = {}
    for clause in record.get("include", []):
        asked[clause["class"]] = asked.get(clause["class"], 0) + clause["count"]
    found: dict[str, int] = {}
    for o in objects:
        found[o.shape] = found.get(o.shape, 0) + 1
    return sum(n - min(n, asked.get(cls, 0)) for cls, n in found.items())


@REWARDS.register("unrequested")
class UnrequestedReward(_RuleReward):
    """ShapesWorld: minus the number of objects the prompt does not ask for (0 for a faithful scene, −1 per
    extra object). A term to add to any reward: ``{constraints: 1.0, unrequested: 0.25}`` charges 0.25 each."""

    name = "unrequested"

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{self.name} reward: {len(images)} images but {len(prompts)} prompts")
        return torch.tensor([-float(unrequested_objects(detect(img).objects, record_for_prompt(p)))
                             for img, p in zip(images, prompts)], dtype=torch.float32)


@REWARDS.register("faithful")
class FaithfulReward(_RuleReward):
    """ShapesWorld: the fraction of GenEval constraints met minus ``charge`` per object the prompt does not ask
    for (a third shape in "a red circle and a blue square" is a defect a person sees, not a bonus).

    R(x, c) = frac_met(x, c) − charge · n_unrequested(x, c)
    """

    name = "faithful"

    def __init__(self, charge: float = 0.25):
        if not charge >= 0:
            raise ValueError(f"faithful.charge={charge}: expected a charge >= 0")
        self.charge = float(charge)
        self.version = f"1-charge{self.charge:g}"  # the charge changes every score: it is part of the cache key

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{self.name} reward: {len(images)} images but {len(prompts)} prompts")
        vals = []
        for img, p in zip(images, prompts):
            objects, record = detect(img).objects, record_for_prompt(p)
            _, frac, _ = evaluate_objects(objects, record)
            vals.append(frac - self.charge * unrequested_objects(objects, record))
        return torch.tensor(vals, dtype=torch.float32)
