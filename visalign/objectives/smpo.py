"""SmPO-Diffusion (Lu et al., ICML 2025): smoothed preferences from reward scores + ReNoise inversion."""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import METHODS
from ..rewards.base import rescale
from ..types import PreferenceBatch, StepOutput, as_float
from .base import Method, pair_metrics, weighted_mean
from .implicit import dpo_logit
from .inversion import inverted_errors
from .pair_heads import build_head


def smoothed_preference(scores: Tensor, normalise: str = "none", temperature: float = 1.0) -> Tensor:
    """p = σ((s̃_w − s̃_l)/T) from [B, 2] reward scores (winner first); s̃ normalised over the batch.

    The authors min-max normalise PickScore with constants fitted to Pick-a-Pic; here the range
    comes from the data ('minmax' over the batch), or 'zscore', or raw scores ('none').
    """
    if normalise not in ("none", "minmax", "zscore"):
        raise ValueError(f"normalise={normalise!r}: expected none, minmax or zscore")
    s = scores.float()
    s = rescale(s.reshape(1, -1), normalise).view_as(s)  # one row: normalised over the whole batch
    return torch.sigmoid((s[:, 0] - s[:, 1]) / temperature)


@METHODS.register("smpo")
class SmPO(Method):
    """SmPO-Diffusion: −log σ(g(2p−1)h) with p from reward scores, on ReNoise-inverted latents (5-step grid)."""

    needs = ("invert", "eps_from_xt", "inversion_grid")

    def __init__(self, beta: float = 5000.0, steps: int = 5, renoise: int = 1, normalise: str = "minmax",
                 temperature: float = 1.0, inversion_model: str = "policy", cache_inversions: bool = False,
                 head: str | dict = "smpo"):
        """``inversion_model=reference cache_inversions=true``: ReNoise-invert once with the reference, reuse."""
        self.beta, self.steps, self.renoise = beta, steps, renoise
        self.cache = {} if cache_inversions else None
        self.normalise, self.temperature, self.inversion_model = normalise, temperature, inversion_model
        self.head = build_head(head)

    def __call__(self, backbone, batch: PreferenceBatch) -> StepOutput:
        if batch.scores is None:
            raise ValueError("smpo needs reward scores per pair (score_0/score_1; make-dataset --pairs writes them)")
        p = smoothed_preference(batch.scores, self.normalise, self.temperature)
        err, ref = inverted_errors(backbone, batch, self.steps, 0.0, self.renoise, self.inversion_model,
                                   self.cache)
        h = dpo_logit(err[:, 0], err[:, 1], ref[:, 0], ref[:, 1], self.beta)
        loss = weighted_mean(self.head(h, p.to(h)), batch.weights)
        return StepOutput(loss, pair_metrics(h, err, ref) | {"p_mean": as_float(p)})
