"""Data-side options over reward-score margins: per-pair weights and a curriculum order."""

from __future__ import annotations

import torch
from torch import Tensor


def margin_weights(margin: Tensor, scale: float = 1.0) -> Tensor:
    """w = tanh(|m|/s), normalised to mean 1: trust pairs with a clear score gap more (margin-weighted DPO)."""
    w = torch.tanh(margin.abs() / scale)
    return w / w.mean().clamp_min(1e-12)


def difficulty_weights(margin: Tensor, scale: float = 1.0) -> Tensor:
    """w = 2σ(−|m|/s), normalised to mean 1: amplify hard, small-margin pairs and damp easy ones (MADPO / DA-DPO)."""
    w = 2.0 * torch.sigmoid(-margin.abs() / scale)
    return w / w.mean().clamp_min(1e-12)


def curriculum_order(margin: Tensor) -> Tensor:
    """Indices from easy (largest |margin|) to hard (Curry-DPO); ties keep their original order."""
    return torch.sort(-margin.abs(), stable=True).indices


def curriculum_stages(margin: Tensor, stages: int) -> list[Tensor]:
    """The easy-to-hard order cut into ``stages`` consecutive chunks of (nearly) equal size (Curry-DPO's
    iterations: the easiest pairs first, each stage trained on its own chunk)."""
    return list(torch.tensor_split(curriculum_order(margin), stages))
