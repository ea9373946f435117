"""Reward models: ``reward(images [B,3,H,W] in [0,1], prompts) -> [B]``; heavy imports inside each factory."""

from ..worlds.shapes import reward as _shapes_reward  # noqa: F401
from . import base  # noqa: F401
from .base import Reward, build_reward, ensemble_scores, normalise

__all__ = ["Reward", "build_reward", "ensemble_scores", "normalise"]
