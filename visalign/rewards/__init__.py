"""Reward models: ``reward(images [B,3,H,W] in [0,1], prompts) -> [B]``; heavy imports inside each factory."""

from ..worlds.shapes import rater as _rater  # noqa: F401
from ..worlds.shapes import reward as _shapes_reward  # noqa: F401
from . import base, clip_models, server, vlm_judge  # noqa: F401
from .base import Reward, build_reward, ensemble_scores, normalise
from .cache import CachedReward

__all__ = ["CachedReward", "Reward", "build_reward", "ensemble_scores", "normalise"]
