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
