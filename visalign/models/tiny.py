"""Tiny but real pipelines built from configs (tests, benchmarks): the shared toy parts (a word tokenizer, CLIP,
T5, an SD-style VAE, a DDIM schedule) and ``build_tiny``, which finds the family that declares a tiny variant
(``tiny_variants``) and calls its ``build_tiny``; the pixel toy is built here.

Each is saved as an ordinary diffusers folder that diffusers' own pipeline classes reload with
``from_pretrained``; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..registry import VOCABULARIES
from .tokenizer import build_word_tokenizer

# a small general vocabulary for prompts in tests, beyond ShapesWorld's words
EXTRA_WORDS = ("cat", "dog", "car", "tree", "house", "painting", "astronaut", "riding", "horse", "the", "in",
               "on", "with", "big", "small", "blue", "sky", "portrait", "city", "night")


def world_words() -> list[str]:
    """Every registered world's words (worlds in name order, each in its own order), once each."""
    return list(dict.fromkeys(w for name in VOCABULARIES.names() for w in VOCABULARIES.get(name)()))


def tiny_tokenizer(max_length: int = 77):
    return build_word_tokenizer(world_words() + list(EXTRA_WORDS), max_length=max_length)


def tiny_clip_config(tok, hidden: int = 32, projection: int = 32, max_pos: int = 77):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=max_pos, projection_dim=projection,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def tiny_vae(shift: bool = False):
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


def tiny_ddim(prediction_type: str = "epsilon", clip_sample: bool = False):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                         clip_sample=clip_sample, set_alpha_to_one=False, prediction_type=prediction_type)


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
    variants[family].build_tiny(family, out, **kwargs)
    return out
