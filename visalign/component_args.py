"""Checks on component arguments shared by every config section that builds a method, head or reward: the
arguments whose range is known by name, and a reward given as a weighted sum of rewards."""

from __future__ import annotations

from typing import Any

from .coercion import coerce
from .errors import require_positive
from .registry import REWARDS, ConfigError

MAX_BATCH = 65536  # a micro-batch larger than this cannot fit any device: refused before anything loads
# image sides in pixels: the largest published text-to-image side is 4096 (PixArt-Sigma, Sana 4K); one image
# of 16384 px a side is 3 GiB in fp32 before any activation, so larger values are typos, refused before loading
SIDE_ARGS, MAX_SIDE = frozenset({"resolution", "image_size"}), 16384
# component arguments whose range is known wherever they appear (methods, heads, rewards): > 0 or >= 0
POSITIVE_ARGS = frozenset({"beta", "steps", "group_size", "prompts_per_round", "round_steps", "samples_per_prompt",
                           "adv_clip", "chase_every", "slow_lr", "temperature", "tau"})
NON_NEGATIVE_ARGS = frozenset({"kl_coef", "min_margin", "clip", "charge", "eta", "delta", "ofs_alpha", "window"})


def check_known_ranges(kwargs: dict, where: str) -> None:
    """A component's numeric arguments with a known range, in one line naming the key (β ≤ 0 inverts DPO)."""
    for k, v in kwargs.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if k in SIDE_ARGS:
            if not isinstance(v, int) or not 0 < v <= MAX_SIDE:
                raise ConfigError(f"{where}.{k}={v!r}: expected a whole number of pixels from 1 to {MAX_SIDE}")
        elif k in POSITIVE_ARGS:
            require_positive(v, f"{where}.{k}")
        elif k in NON_NEGATIVE_ARGS:
            require_positive(v, f"{where}.{k}", allow_zero=True)


def is_reward_ensemble(value: Any) -> bool:
    """A list of rewards, or a mapping {reward name: weight} (every key a registered reward, no 'name')."""
    if isinstance(value, list):
        return True
    return isinstance(value, dict) and "name" not in value and bool(value) and all(k in REWARDS for k in value)


def reward_ensemble(value: Any, where: str, build_component) -> list[dict]:
    """A weighted reward sum, ``[{name, weight, **kwargs}, ...]``, each entry checked against its reward by
    ``build_component`` (config's, passed in: this module sits below config)."""
    items = [{"name": k, "weight": w} for k, w in value.items()] if isinstance(value, dict) else value
    if not items:
        raise ConfigError(f"{where}: an empty reward list; name at least one reward")
    out = []
    for i, item in enumerate(items):
        item = {"name": item} if isinstance(item, str) else item
        if not isinstance(item, dict):
            raise ConfigError(f"{where}[{i}]: expected a reward name or {{name, weight, ...}}, got {item!r}")
        item = dict(item)
        weight = coerce(item.pop("weight", 1.0), float, f"{where}[{i}].weight")
        out.append(build_component(item, REWARDS, f"{where}[{i}]").to_dict() | {"weight": weight})
    return out
