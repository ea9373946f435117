"""PixArt-Σ (and -α): PixArtTransformer2DModel on SD-VAE latents with a T5 encoder; a DDPM ε (or v) model.

As ``PixArtSigmaPipeline`` runs it: T5's last hidden states with their attention mask (300 tokens for Σ,
120 for α), the empty prompt as the unconditional one, and a learned-variance head (out_channels = 2 x
latent channels) whose second half is dropped: the methods train the ε half, as diffusers' PixArt LoRA
script does. α's 1024 px models take resolution and aspect-ratio inputs, given as the square training size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..registry import register_preset
from .backbone import Cond, register_family
from .diffusion import DiffusionBackbone
from .load import load_diffusers, load_transformers
from .quantize import quantization_kwargs
from .unet import LatentMixin

# DPO's beta as SD's (ε errors on the same scale); PixArt's own fine-tuning lr for the transformer
register_preset("pixart", {"model": {"name": "pixart", "path": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"},
                          "objective": {"name": "diffusion_dpo", "beta": 5000.0},
                          "train": {"lr": 1e-5, "mixed_precision": "bf16", "gradient_checkpointing": True,
                                    "guidance": 4.5}})


def t5_encode(tokenizer, encoder, prompts: Sequence[str], max_length: int) -> Cond:
    """T5's last hidden states and attention mask for prompts padded to ``max_length`` (PixArt's, Sana's)."""
    tok = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt")
    mask = tok.attention_mask.to(encoder.device)
    return Cond({"hidden": encoder(tok.input_ids.to(encoder.device), attention_mask=mask)[0], "mask": mask})


# guidance: PixArtSigmaPipeline's default. PixArt pipelines have no LoRA mixin: Sana's writer saves the same
# transformer.* keys
@register_family("pixart", pipeline="PixArtSigmaPipeline", guidance=4.5, lora=("SanaPipeline", "transformer"),
                 tiny=("pixart",), tiny_kwargs={"max_sequence_length": 8})
class PixArtBackbone(LatentMixin, DiffusionBackbone):
    """PixArt-Σ / -α: a DiT over SD-VAE latents with T5 text; ε (or v) with a learned-variance head dropped."""

    denoiser_subfolder = "transformer"

    def __init__(self, path: str, resolution: int | None = None, max_sequence_length: int = 300,
                 revision: str | None = None, load_encoders: bool = True,
                 quantize: str = "none"):
        from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel
        from transformers import AutoTokenizer, T5EncoderModel

        kw = {"revision": revision} if revision else {}
        transformer = load_diffusers(PixArtTransformer2DModel, path, "transformer", what="transformer",
                                      **kw, **quantization_kwargs(quantize))
        self.vae = self.text_encoder = self.tokenizer = None
        if load_encoders:
            self.vae = load_diffusers(AutoencoderKL, path, "vae", what="VAE", **kw).eval().requires_grad_(False)
            self.text_encoder = load_transformers(T5EncoderModel, path, "text_encoder", what="T5", **kw).eval()
            self.text_encoder.requires_grad_(False)
            self.tokenizer = load_transformers(AutoTokenizer, path, "tokenizer", what="T5 tokenizer")
        vae_cfg = self.vae.config if self.vae is not None else AutoencoderKL.load_config(path, subfolder="vae")
        factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        self.resolution = resolution or transformer.config.sample_size * factor
        self.max_sequence_length, self.path = max_sequence_length, path
        sched = load_diffusers(DDPMScheduler, path, "scheduler", what="scheduler")
        side = self.resolution // factor
        self.learned_sigma = transformer.config.out_channels == 2 * transformer.config.in_channels
        self.size_inputs = bool(transformer.config.use_additional_conditions)
        super().__init__(transformer, sched.config, (transformer.config.in_channels, side, side))

    def encode_prompts(self, prompts: Sequence[str], image_meta: dict | None = None) -> Cond:
        return t5_encode(self.tokenizer, self.text_encoder, prompts, self.max_sequence_length)

    def _forward(self, model, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        added = {"resolution": None, "aspect_ratio": None}
        if self.size_inputs:  # PixArt-α 1024: the image size and aspect ratio as inputs (square training size)
            n = x_t.shape[0]
            added = {"resolution": torch.full((n, 2), float(self.resolution), device=x_t.device, dtype=x_t.dtype),
                     "aspect_ratio": torch.ones(n, 1, device=x_t.device, dtype=x_t.dtype)}
        out = model(x_t, encoder_hidden_states=cond.tensors["hidden"], encoder_attention_mask=cond.tensors["mask"],
                    timestep=t, added_cond_kwargs=added).sample
        return out.chunk(2, dim=1)[0] if self.learned_sigma else out

    @staticmethod
    def build_tiny(variant: str, out) -> None:
        """A toy PixArt-Σ folder: 1 transformer layer, tiny T5 and SD-style VAE, PixArt's DPM-Solver config."""
        from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

        from .tiny import tiny_t5, tiny_tokenizer, tiny_vae

        tok = tiny_tokenizer(max_length=300)
        transformer = PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
            cross_attention_dim=16, sample_size=16, patch_size=2, caption_channels=32, norm_num_groups=4,
            use_additional_conditions=False)
        sched = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                            prediction_type="epsilon")
        PixArtSigmaPipeline(tokenizer=tok, text_encoder=tiny_t5(tok), vae=tiny_vae(), transformer=transformer,
                            scheduler=sched).save_pretrained(out, safe_serialization=True)
