"""DDIM-InPO (Lu et al., CVPR 2025): Diffusion-DPO on latents found by DDIM inversion."""

from __future__ import annotations

from ..registry import METHODS
from ..types import PreferenceBatch, StepOutput
from .base import Method, pair_metrics, weighted_mean
from .implicit import implicit_reward
from .inversion import inverted_errors
from .pair_heads import build_head


@METHODS.register("inpo")
class InPO(Method):
    """DDIM-InPO: DPO logit at inverted x_t with reparametrised ε̂ (authors: 10-step grid, η = 0.1, current policy)."""

    needs = ("invert", "eps_from_xt", "inversion_grid")

    def __init__(self, beta: float = 5000.0, steps: int = 10, eta: float = 0.1, inversion_model: str = "policy",
                 cache_inversions: bool = False, head: str | dict = "sigmoid"):
        """``inversion_model=reference cache_inversions=true eta=0``: invert once with the reference, reuse."""
        self.beta, self.steps, self.eta, self.inversion_model = beta, steps, eta, inversion_model
        self.head = build_head(head)
        self.cache = {} if cache_inversions else None

    def __call__(self, backbone, batch: PreferenceBatch) -> StepOutput:
        err, ref = inverted_errors(backbone, batch, self.steps, self.eta, 0, self.inversion_model, self.cache)
        r = implicit_reward(err, ref, self.beta)
        loss = weighted_mean(self.head.pair_loss(r[:, 0], r[:, 1], batch.label.to(r), batch.scores), batch.weights)
        return StepOutput(loss, pair_metrics(r[:, 0] - r[:, 1], err, ref) | self.head.metrics())
