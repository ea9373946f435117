"""The ShapesWorld renderer as a pipeline: always-correct images for any ShapesWorld prompt.

Syn-Pic builds its lists from several models of different quality; in ShapesWorld the renderer is
the perfect one, so ``make-dataset --model shapes-render --model assets/shapes-base`` yields pairs of a
correct image against the base model's failures. Seeds come from the latents make-dataset passes.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from ...models.backbone import SampleOutput
from ...registry import BACKBONES
from .detector import record_for_prompt
from .render import render


@BACKBONES.register("shapes-render")
class RenderPipeline(torch.nn.Module):
    """ShapesWorld's exact renderer as a model: ``sample(prompts, latents=...)`` -> always-correct images."""

    family = "shapes-render"
    needs_weights = False  # `make-dataset --model shapes-render`: a name, no folder
    renders_on_cpu = True
    default_guidance = 3.0  # unused (a renderer draws what the prompt says); what provenance always recorded

    def __init__(self, path: str = "", size: int = 32):
        super().__init__()
        self.size = size
        self.sample_shape = (3, size, size)
        self.sample_dtype = None
        self.device = torch.device("cpu")

    def unwrapped(self) -> torch.nn.Module:
        return self

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], steps: int = 0, guidance: float = 0.0, *, latents=None,
               **_) -> SampleOutput:
        n = len(prompts)
        if latents is None:
            latents = torch.randn(n, *self.sample_shape)
        seeds = [zlib.crc32(latents[i].detach().cpu().numpy().tobytes()) for i in range(n)]
        draw_size = 64 if self.size > 32 else 32
        imgs = [render(record_for_prompt(p), s, draw_size)[0] for p, s in zip(prompts, seeds)]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
        if draw_size != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return SampleOutput(images=x, latents=x)

    def resize_to(self, size: int) -> None:
        self.size = size
        self.sample_shape = (3, size, size)
