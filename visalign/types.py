"""The data contract between loaders, methods and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class PreferenceBatch:
    """B prompts with K images each. Pairs (K = 2) are ordered winner first; lists by nothing in particular.

    Either ``images`` [B, K, 3, H, W] in [0, 1] or cached ``latents`` (mean, std) [B, K, C, h, w] are set;
    ``cond`` holds cached text conditioning for the B prompts when the cache is on.
    """

    prompts: list[str]
    label: Tensor  # [B] P(image 0 ≻ image 1) after ordering: in [0.5, 1] for pairs
    images: Tensor | None = None
    latent_mean: Tensor | None = None
    latent_std: Tensor | None = None
    cond: object | None = None  # models.Cond for the B prompts
    scores: Tensor | None = None  # [B, K] reward scores when known
    weights: Tensor | None = None  # [B] per-pair loss weights
    image_meta: dict = field(default_factory=dict)  # e.g. original_size / crop_top_left [B, 2] (SDXL)
    extras: dict = field(default_factory=dict)  # method-specific tensors (online methods' trajectories)
    log: dict = field(default_factory=dict)  # values the data source logs with the step (a round's mean reward)

    @property
    def size(self) -> int:
        return len(self.prompts)

    def to(self, device) -> PreferenceBatch:
        def mv(v):
            return v.to(device) if isinstance(v, Tensor) else (v.to(device) if hasattr(v, "to") else v)

        return PreferenceBatch(
            prompts=self.prompts, label=self.label.to(device), images=mv(self.images),
            latent_mean=mv(self.latent_mean), latent_std=mv(self.latent_std), cond=mv(self.cond),
            scores=mv(self.scores), weights=mv(self.weights),
            image_meta={k: mv(v) for k, v in self.image_meta.items()},
            extras={k: mv(v) for k, v in self.extras.items()}, log=self.log)


@dataclass
class StepOutput:
    """A method's result for one batch: the scalar loss to minimise and detached metrics to log."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def as_float(t: Tensor | float) -> float:
    return float(t.detach().float().mean()) if isinstance(t, Tensor) else float(t)


__all__ = ["PreferenceBatch", "StepOutput", "as_float"]
