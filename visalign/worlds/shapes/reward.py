"""The exact ShapesWorld reward, registered as ``shapes``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ...registry import REWARDS
from .captions import check_captions
from .detector import record_for_prompt, shapes_reward_value


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
