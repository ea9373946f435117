"""Pixel-space text-to-image backbone (no VAE): the ShapesWorld base and other small pixel models."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..model_folders import declared_parameterisation
from .backbone import Cond, register_family
from .diffusion import DiffusionBackbone
from .load import load_diffusers, load_transformers
from .quantize import quantization_kwargs
from .unet import tokenize


# no pipeline class: a folder of plain diffusers/transformers parts (VisalignPixelPipeline names it); its LoRA
# has SD's unet.* keys
@register_family("pixel", pipeline="VisalignPixelPipeline", guidance=3.0, lora=("StableDiffusionPipeline", "unet"),
                 tiny=("pixel",))
class PixelBackbone(DiffusionBackbone):
    """A text-conditioned UNet2DConditionModel on pixels in [−1, 1] with a CLIP text encoder; ε, v or k-Diff."""

    @staticmethod
    def build_tiny(variant: str, out, size: int = 16, prediction_type: str = "epsilon") -> None:
        """A tiny pixel-space model with the ShapesWorld folder layout (random weights)."""
        from .tiny import world_words  # ShapesWorld's vocabulary, beside the other toy parts

        # ShapesWorld's layout and defaults at toy width (its v + trailing recipe, the prediction type as asked)
        unet, te, tok, sched = build_pixel_components(size, (32, 32), 32, 1, 16, world_words(), "v_prediction",
                                                      "trailing")
        sched.register_to_config(prediction_type=prediction_type)
        save_pixel_folder(Path(out), unet.eval(), te.eval(), tok, sched)

    def __init__(self, path: str, revision: str | None = None, load_encoders: bool = True,
                 quantize: str = "none"):
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        kw = {"revision": revision} if revision else {}
        unet = load_diffusers(UNet2DConditionModel, path, "unet", what="UNet", **kw, **quantization_kwargs(quantize))
        self.text_encoder = self.tokenizer = None
        if load_encoders:
            self.text_encoder = load_transformers(CLIPTextModel, path, "text_encoder", what="text encoder",
                                                  **kw).eval().requires_grad_(False)
            self.tokenizer = load_transformers(AutoTokenizer, path, "tokenizer", what="tokenizer")
        sched = load_diffusers(DDPMScheduler, path, "scheduler", what="scheduler")
        self.path = path
        self.vae = None
        self.resolution = int(unet.config.sample_size)
        super().__init__(unet, sched.config, (unet.config.in_channels, self.resolution, self.resolution),
                         declared_parameterisation(path).get("k"))

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


def build_pixel_components(size: int, block_out_channels: tuple[int, ...], text_hidden: int, text_layers: int,
                           max_tokens: int, words, prediction_type: str = "epsilon",
                           timestep_spacing: str = "leading"):
    """Fresh (unet, text_encoder, tokenizer, scheduler) of a pixel model: a UNet on RGB with cross-attention
    to a small CLIP text encoder over a closed word vocabulary (``words``), and a cosine DDPM schedule."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import build_word_tokenizer

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if timestep_spacing not in ("leading", "trailing", "linspace"):
        raise ValueError(f"timestep_spacing must be 'leading', 'trailing' or 'linspace', got {timestep_spacing!r}")
    tokenizer = build_word_tokenizer(words, max_length=max_tokens)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
        num_attention_heads=4, num_hidden_layers=text_layers, max_position_embeddings=max_tokens,
        projection_dim=text_hidden, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    n = len(block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=size, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=block_out_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=text_hidden, attention_head_dim=4, norm_num_groups=16)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type=prediction_type, timestep_spacing=timestep_spacing, clip_sample=True)
    return unet, text_encoder, tokenizer, scheduler


def save_pixel_folder(out: Path, unet, text_encoder, tokenizer, scheduler, extra: dict | None = None) -> None:
    """Write a pixel model's folder (plain diffusers/transformers parts, safetensors) atomically: built in a
    temporary folder, then renamed; ``extra`` JSON files (name -> content) beside them."""
    import json
    import shutil

    import diffusers
    from diffusers import DDIMScheduler

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "tokenizer")
    DDIMScheduler.from_config(scheduler.config).save_pretrained(tmp / "scheduler")
    index = {"_class_name": PixelBackbone.pipeline_class, "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "unet": ["diffusers", "UNet2DConditionModel"]}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    for name, payload in (extra or {}).items():
        (tmp / name).write_text(json.dumps(payload, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
