"""Pixel-space text-to-image backbone (no VAE): the ShapesWorld base and other small pixel models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..registry import BACKBONES
from .backbone import Cond
from .diffusion import DiffusionBackbone
from .load import load_diffusers, load_transformers
from .unet import tokenize


@BACKBONES.register("pixel")
class PixelBackbone(DiffusionBackbone):
    """A text-conditioned UNet2DConditionModel on pixels in [−1, 1] with a CLIP text encoder; ε or v."""

    family = "pixel"
    default_guidance = 3.0
    lora_pipeline, lora_prefix = "StableDiffusionPipeline", "unet"
    pipeline_class = "VisalignPixelPipeline"  # a folder of plain diffusers/transformers parts, no pipeline class
    tiny_variants = ("pixel",)

    def __init__(self, path: str, revision: str | None = None, load_encoders: bool = True):
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        kw = {"revision": revision} if revision else {}
        unet = load_diffusers(UNet2DConditionModel, path, "unet", what="UNet", **kw)
        self.text_encoder = self.tokenizer = None
        if load_encoders:
            self.text_encoder = load_transformers(CLIPTextModel, path, "text_encoder", what="text encoder",
                                                  **kw).eval().requires_grad_(False)
            self.tokenizer = load_transformers(AutoTokenizer, path, "tokenizer", what="tokenizer")
        sched = load_diffusers(DDPMScheduler, path, "scheduler", what="scheduler")
        self.path = path
        self.vae = None
        self.resolution = int(unet.config.sample_size)
        super().__init__(unet, sched.config, (unet.config.in_channels, self.resolution, self.resolution))

    def encode_prompts(self, prompts: Sequence[str], image_meta: dict | None = None) -> Cond:
        ids = tokenize(self.tokenizer, prompts, self.text_encoder.device)
        return Cond({"hidden": self.text_encoder(ids)[0]})

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return images.to(self.device) * 2 - 1

    def latent_moments(self, images: Tensor) -> tuple[Tensor, None]:
        """Pixels are their own latents: a point mass (no std, so no noise is drawn for them)."""
        return self.encode_images(images), None

    def decode(self, x0: Tensor) -> Tensor:
        return ((x0.float() + 1) / 2).clamp(0, 1)
