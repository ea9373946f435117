"""Tiny but real pipelines built from configs (tests, benchmarks): SD1.5, SDXL, SD3 and pixel here, and the
tiny builders other families carry in their own file (``tiny_variants`` + ``build_tiny``).

Each is saved as an ordinary diffusers folder that diffusers' own pipeline classes reload with
``from_pretrained``; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..worlds.shapes.vocab import caption_words
from .tokenizer import build_word_tokenizer

# a small general vocabulary for prompts in tests, beyond ShapesWorld's words
EXTRA_WORDS = ("cat", "dog", "car", "tree", "house", "painting", "astronaut", "riding", "horse", "the", "in",
               "on", "with", "big", "small", "blue", "sky", "portrait", "city", "night")
FAMILIES = ("sd15", "sdxl", "sd3", "pixel")


def tiny_tokenizer(max_length: int = 77):
    return build_word_tokenizer(list(caption_words()) + list(EXTRA_WORDS), max_length=max_length)


def _clip_config(tok, hidden: int = 32, projection: int = 32, max_pos: int = 77):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=max_pos, projection_dim=projection,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def _vae(shift: bool = False):
    from diffusers import AutoencoderKL

    kw = dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035) if shift \
        else dict(scaling_factor=0.18215)
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=32, sample_size=32, **kw)


def tiny_t5(tok, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                   decoder_start_token_id=tok.pad_token_id))


def _ddim(prediction_type: str = "epsilon", clip_sample: bool = False):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                         clip_sample=clip_sample, set_alpha_to_one=False, prediction_type=prediction_type)


def build_sd15(out: Path, prediction_type: str = "epsilon") -> Path:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = tiny_tokenizer()
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_clip_config(tok)), tokenizer=tok,
                                   unet=unet, scheduler=_ddim(prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_sdxl(out: Path) -> Path:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80, norm_num_groups=32)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_clip_config(tok)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tok)), tokenizer_2=tiny_tokenizer(),
        unet=unet, scheduler=_ddim())
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_sd3(out: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tok = tiny_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(shift=True),
        text_encoder=CLIPTextModelWithProjection(_clip_config(tok)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tok)), tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_pixel(out: Path, size: int = 16, prediction_type: str = "epsilon") -> Path:
    """A tiny pixel-space model with the ShapesWorld folder layout (random weights)."""
    from .pixel import build_pixel_components, save_pixel_folder

    # ShapesWorld's layout and defaults at toy width (its v + trailing recipe, the prediction type as asked)
    unet, te, tok, sched = build_pixel_components(size, (32, 32), 32, 1, 16, caption_words(), "v_prediction",
                                                  "trailing")
    sched.register_to_config(prediction_type=prediction_type)
    save_pixel_folder(Path(out), unet.eval(), te.eval(), tok, sched)
    return Path(out)


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl, "sd3": build_sd3, "pixel": build_pixel}


def tiny_variants() -> dict[str, type]:
    """Every tiny variant a registered family declares (``tiny_variants``) -> its backbone class."""
    from ..registry import BACKBONES

    out = {}
    for name in BACKBONES.names():
        cls = BACKBONES.get(name)
        out |= {v: cls for v in getattr(cls, "tiny_variants", ())}
    return out


def build_tiny(family: str, out: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build and save the tiny pipeline ``family`` (a family's tiny variant: sd15 | sdxl | sd3 | pixel | flux
    | flux-schnell ...) to ``out``; returns ``out``."""
    variants = tiny_variants()
    if family not in variants:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {', '.join(variants)}")
    torch.manual_seed(seed)
    out = Path(out)
    if family in BUILDERS:
        BUILDERS[family](out, **kwargs)
    else:
        variants[family].build_tiny(family, out, **kwargs)
    return out
