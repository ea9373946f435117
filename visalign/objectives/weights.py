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


def curriculum_order(margin: Tensor, stages: int = 1) -> Tensor:
    """Indices from easy (largest |margin|) to hard (Curry-DPO); ties keep their original order.

    With ``stages`` > 1 the order is cut into that many consecutive chunks; within a chunk the
    original order is kept, so each stage can be shuffled by the loader without mixing stages.
    """
    order = torch.sort(-margin.abs(), stable=True).indices
    if stages <= 1:
        return order
    chunks = torch.tensor_split(order, stages)
    return torch.cat([torch.sort(c).values for c in chunks])
