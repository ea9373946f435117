"""Reward models: ``reward(images [B,3,H,W] in [0,1], prompts) -> [B]``; heavy imports inside each factory.

Reward modules (here, in a world such as ShapesWorld, or in a plug-in package) register themselves when
imported; ``registry.load_all`` finds them.
"""

from .base import Reward, build_reward, ensemble_scores, normalise
from .cache import CachedReward

__all__ = ["CachedReward", "Reward", "build_reward", "ensemble_scores", "normalise"]
