"""What flows between a backbone and the methods: noised batches, text conditioning, sampler outputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Noised:
    """A forward-noised batch: model input x_t at timestep t and the regression target."""

    x_t: Tensor
    t: Tensor
    target: Tensor


@dataclass
class Cond:
    """Text conditioning as named batch-first tensors (hidden states, pooled embeds, SDXL time ids...)."""

    tensors: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def map(self, fn) -> Cond:
        return Cond({k: fn(v) for k, v in self.tensors.items()})

    def repeat_interleave(self, k: int) -> Cond:
        return self.map(lambda v: v.repeat_interleave(k, dim=0))

    def __getitem__(self, idx) -> Cond:
        return self.map(lambda v: v[idx])

    def to(self, *args, **kwargs) -> Cond:
        return self.map(lambda v: v.to(*args, **kwargs))

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        keys = conds[0].tensors.keys()
        return Cond({k: torch.cat([c.tensors[k] for c in conds]) for k in keys})


@dataclass
class SampleOutput:
    """Generated images in [0, 1] and, when asked, the trajectory: x_t per step, timesteps, log-probs."""

    images: Tensor
    latents: Tensor
    trajectory: list[Tensor] | None = None  # x_T ... x_0, each [N, ...]
    timesteps: Tensor | None = None  # [S]
    log_probs: Tensor | None = None  # [N, S] per-step log p(x_{t-1} | x_t), mean over elements
