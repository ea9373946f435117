"""Latent UNet backbones: Stable Diffusion 1.x/2.x (ε or v) and SDXL (two text encoders, micro-conditioning)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..registry import register_preset
from .backbone import Cond, register_family
from .diffusion import DiffusionBackbone
from .load import load_diffusers, load_transformers
from .quantize import quantization_kwargs


def tokenize(tokenizer, prompts: Sequence[str], device) -> Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


class LatentMixin:
    """VAE latents with the model's scaling (and, for SD3, shift)."""

    vae: torch.nn.Module | None

    def _vae_scale(self) -> tuple[float, float]:
        cfg = self.vae.config
        return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)

    def latent_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of the VAE posterior for images in [0, 1], already scaled to model space."""
        scale, shift = self._vae_scale()
        dist = self.vae.encode(images.to(self.vae.device, self.vae.dtype) * 2 - 1).latent_dist
        return (dist.mean.float() - shift) * scale, dist.std.float() * scale

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean, std = self.latent_moments(images)
        return mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)

    def decode(self, x0: Tensor) -> Tensor:
        scale, shift = self._vae_scale()
        out = self.vae.decode((x0 / scale + shift).to(self.vae.dtype)).sample
        return ((out.float() + 1) / 2).clamp(0, 1)


register_preset("sd15", {"model": {"name": "sd", "path": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
                         "objective": {"name": "diffusion_dpo", "beta": 5000.0},
                         "train": {"lr": 1e-5, "mixed_precision": "bf16"}})
register_preset("sdxl", {"model": {"name": "sdxl", "path": "stabilityai/stable-diffusion-xl-base-1.0"},
                         "objective": {"name": "diffusion_dpo", "beta": 5000.0},
                         "train": {"lr": 1e-5, "mixed_precision": "bf16", "gradient_checkpointing": True}})


# guidance: the family's usual CFG scale when a model folder declares none
@register_family("sd", pipeline="StableDiffusionPipeline", guidance=7.5, lora=("StableDiffusionPipeline", "unet"),
                 tiny=("sd15",))
class SDBackbone(LatentMixin, DiffusionBackbone):
    """Stable Diffusion 1.x/2.x: UNet2DConditionModel + AutoencoderKL + CLIP text encoder; ε or v prediction."""


    @staticmethod
    def build_tiny(variant: str, out, **kwargs) -> None:
        tiny_sd15(out, **kwargs)

    def __init__(self, path: str, resolution: int | None = None, revision: str | None = None,
                 variant: str | None = None, load_encoders: bool = True,
                 quantize: str = "none"):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        kw = {k: v for k, v in {"revision": revision, "variant": variant}.items() if v}
        self.kw, self.path = kw, path
        unet = load_diffusers(UNet2DConditionModel, path, "unet", what="UNet", **kw, **quantization_kwargs(quantize))
        self.vae = self.text_encoder = self.tokenizer = None
        if load_encoders:
            self.vae = load_diffusers(AutoencoderKL, path, "vae", what="VAE", **kw).eval().requires_grad_(False)
            self.text_encoder = load_transformers(CLIPTextModel, path, "text_encoder", what="text encoder",
                                                  **kw).eval().requires_grad_(False)
            self.tokenizer = load_transformers(AutoTokenizer, path, "tokenizer", what="tokenizer")
        vae_cfg = self.vae.config if self.vae is not None else AutoencoderKL.load_config(path, subfolder="vae")
        sched = load_diffusers(DDPMScheduler, path, "scheduler", what="scheduler")
        factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        res = resolution or unet.config.sample_size * factor
        self.resolution = res
        super().__init__(unet, sched.config, (unet.config.in_channels, res // factor, res // factor))

    def encode_prompts(self, prompts: Sequence[str], image_meta: dict | None = None) -> Cond:
        ids = tokenize(self.tokenizer, prompts, self.text_encoder.device)
        return Cond({"hidden": self.text_encoder(ids)[0]})


@register_family("sdxl", pipeline="StableDiffusionXLPipeline", guidance=5.0, tiny=("sdxl",))
class SDXLBackbone(SDBackbone):
    """SDXL: two CLIP text encoders (penultimate hidden states + pooled) and size/crop micro-conditioning."""

    @staticmethod
    def build_tiny(variant: str, out, **kwargs) -> None:
        tiny_sdxl(out, **kwargs)

    def __init__(self, path: str, resolution: int | None = None, revision: str | None = None,
                 variant: str | None = None, load_encoders: bool = True,
                 quantize: str = "none"):
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        super().__init__(path, resolution, revision, variant, load_encoders, quantize)
        self.text_encoder_2 = self.tokenizer_2 = None
        if load_encoders:
            self.text_encoder_2 = load_transformers(CLIPTextModelWithProjection, path, "text_encoder_2",
                                                    what="second text encoder", **self.kw).eval().requires_grad_(False)
            self.tokenizer_2 = load_transformers(AutoTokenizer, path, "tokenizer_2", what="second tokenizer")

    def time_ids(self, n: int, image_meta: dict | None, device) -> Tensor:
        """(orig_h, orig_w, crop_top, crop_left, target_h, target_w) per image, from the data when known."""
        res = self.resolution
        meta = image_meta or {}
        orig = meta.get("original_size")
        crop = meta.get("crop_top_left")
        orig = torch.as_tensor(orig, dtype=torch.float32) if orig is not None else torch.full((n, 2), float(res))
        crop = torch.as_tensor(crop, dtype=torch.float32) if crop is not None else torch.zeros(n, 2)
        target = torch.full((n, 2), float(res))
        return torch.cat([orig, crop, target], 1).to(device)

    def encode_prompts(self, prompts: Sequence[str], image_meta: dict | None = None) -> Cond:
        hidden, pooled = [], None
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = enc(tokenize(tok, prompts, enc.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0] if enc is self.text_encoder_2 else pooled
        return Cond({"hidden": torch.cat(hidden, -1), "pooled": pooled,
                     "time_ids": self.time_ids(len(prompts), image_meta, pooled.device)})

    def _forward(self, model, x_t, t, cond):
        added = {"text_embeds": cond.tensors["pooled"], "time_ids": cond.tensors["time_ids"]}
        return model(x_t, t, encoder_hidden_states=cond.tensors["hidden"], added_cond_kwargs=added).sample


def tiny_sd15(out, prediction_type: str = "epsilon"):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .tiny import tiny_clip_config, tiny_ddim, tiny_tokenizer, tiny_vae

    tok = tiny_tokenizer()
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(tiny_clip_config(tok)), tokenizer=tok,
                                   unet=unet, scheduler=tiny_ddim(prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def tiny_sdxl(out):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .tiny import tiny_clip_config, tiny_ddim, tiny_tokenizer, tiny_vae

    tok = tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80, norm_num_groups=32)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(tiny_clip_config(tok)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(tiny_clip_config(tok)), tokenizer_2=tiny_tokenizer(),
        unet=unet, scheduler=tiny_ddim())
    pipe.save_pretrained(out, safe_serialization=True)
    return out
