"""Sana: SanaTransformer2DModel (linear-attention DiT) on DC-AE latents with a Gemma-2 text encoder; flow.

The flow conventions are SD3's (``FlowBackbone``: x_t = (1−σ)x0 + σε, target v = ε − x0, t = 1000σ); what
differs, as ``SanaPipeline`` runs it:

- the text: Gemma-2's last hidden states with their attention mask; a prompt is prefixed with the pipeline's
  complex human instruction (its own default text), and the first token plus the last ``max_sequence_length``
  − 1 are kept; the unconditional prompt "" gets no instruction (as the pipeline's negative prompt);
- the timestep input is t x ``timestep_scale``; a learned-variance head (out = 2 x latent channels) is halved;
- DC-AE latents are deterministic (no posterior std) and scaled by ``scaling_factor``;
- the grid's shift is the scheduler's ``flow_shift`` (Sana ships DPM-Solver with flow sigmas; visalign samples
  and scores log-densities with the Euler / SDE steps of every flow family, on the same shifted σ's).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor

from ..registry import register_preset
from .backbone import Cond, register_family
from .flow import FlowBackbone
from .load import load_diffusers, load_transformers
from .quantize import quantization_kwargs

register_preset("sana", {"model": {"name": "sana", "path": "Efficient-Large-Model/Sana_1600M_1024px_diffusers"},
                         "objective": {"name": "diffusion_dpo", "beta": 100.0},
                         "train": {"lr": 1e-5, "mixed_precision": "bf16", "gradient_checkpointing": True,
                                   "guidance": 4.5}})


def default_instruction() -> str:
    """SanaPipeline's own complex human instruction (its ``__call__`` default), joined as it joins it."""
    from diffusers import SanaPipeline

    return "\n".join(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


@register_family("sana", pipeline="SanaPipeline", guidance=4.5, tiny=("sana",),  # guidance: SanaPipeline's default
                 tiny_kwargs={"max_sequence_length": 8})
class SanaBackbone(FlowBackbone):
    """Sana: rectified flow on DC-AE latents with Gemma-2 text (instruction-prefixed prompts)."""

    def __init__(self, path: str, resolution: int | None = None, logit_mean: float = 0.0, logit_std: float = 1.0,
                 max_sequence_length: int = 300, instruction: bool = True, revision: str | None = None,
                 load_encoders: bool = True,
                 quantize: str = "none"):
        from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
        from transformers import AutoModel, AutoTokenizer

        kw = {"revision": revision} if revision else {}
        self.denoiser = load_diffusers(SanaTransformer2DModel, path, "transformer", what="transformer",
                                      **kw, **quantization_kwargs(quantize))
        self.vae = self.text_encoder = self.tokenizer = None
        if load_encoders:
            self.vae = load_diffusers(AutoencoderDC, path, "vae", what="DC-AE", **kw).eval().requires_grad_(False)
            self.text_encoder = load_transformers(AutoModel, path, "text_encoder", what="Gemma-2 text encoder",
                                                  **kw).eval().requires_grad_(False)
            self.tokenizer = load_transformers(AutoTokenizer, path, "tokenizer", what="tokenizer")
            self.tokenizer.padding_side = "right"
        config = dict(load_diffusers(FlowMatchEulerDiscreteScheduler, path, "scheduler", what="scheduler").config)
        self.shift = float(config.get("flow_shift") or config.get("shift") or 1.0)
        self.scheduler_config = {"num_train_timesteps": config.get("num_train_timesteps", 1000), "shift": self.shift}
        self.num_train_timesteps = int(self.scheduler_config["num_train_timesteps"])
        vae_cfg = self.vae.config if self.vae is not None else AutoencoderDC.load_config(path, subfolder="vae")
        factor = 2 ** (len(vae_cfg["encoder_block_out_channels"]) - 1)
        self.resolution = resolution or self.denoiser.config.sample_size * factor
        side = self.resolution // factor
        self.sample_shape = (int(vae_cfg["latent_channels"]), side, side)
        self.logit_mean, self.logit_std, self.path = logit_mean, logit_std, path
        self.max_sequence_length = max_sequence_length
        self.instruction = default_instruction() if instruction else ""
        cfg = self.denoiser.config
        self.learned_sigma = cfg.out_channels == 2 * cfg.in_channels
        self.timestep_scale = float(getattr(cfg, "timestep_scale", 1.0))

    def _encode(self, prompts: Sequence[str], instruction: str) -> Cond:
        n = self.max_sequence_length
        length = n if not instruction else len(self.tokenizer.encode(instruction)) + n - 2
        tok = self.tokenizer([instruction + p for p in prompts], padding="max_length", max_length=length,
                             truncation=True, add_special_tokens=True, return_tensors="pt")
        mask = tok.attention_mask.to(self.text_encoder.device)
        hidden = self.text_encoder(tok.input_ids.to(self.text_encoder.device), attention_mask=mask)[0]
        keep = [0, *range(-n + 1, 0)]  # Sana paper, Sec. 3.1: the first token and the prompt's tail
        return Cond({"hidden": hidden[:, keep], "mask": mask[:, keep]})

    def encode_prompts(self, prompts: Sequence[str], image_meta: dict | None = None) -> Cond:
        return self._encode(prompts, self.instruction)

    def unconditional(self, n: int, guidance: float, image_meta: dict | None = None) -> Cond | None:
        return None if guidance == 1.0 else self._encode([""] * n, "")

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        model, x_in, t, cond = self.denoiser_inputs(x_t, t, cond)
        out = model(x_in, encoder_hidden_states=cond.tensors["hidden"], encoder_attention_mask=cond.tensors["mask"],
                    timestep=t.to(x_in.dtype) * self.timestep_scale).sample
        return (out.chunk(2, dim=1)[0] if self.learned_sigma else out).to(x_t.dtype)

    # DC-AE: a deterministic autoencoder, latents scaled by scaling_factor
    def latent_moments(self, images: Tensor) -> tuple[Tensor, None]:
        z = self.vae.encode(images.to(self.vae.device, self.vae.dtype) * 2 - 1).latent
        return z.float() * float(self.vae.config.scaling_factor), None

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.latent_moments(images)[0]

    def decode(self, x0: Tensor) -> Tensor:
        out = self.vae.decode((x0 / float(self.vae.config.scaling_factor)).to(self.vae.dtype)).sample
        return ((out.float() + 1) / 2).clamp(0, 1)

    @staticmethod
    def build_tiny(variant: str, out) -> None:
        """A toy Sana folder: 1 linear-attention layer, a tiny Gemma-2 and DC-AE, Sana's flow DPM-Solver config."""
        from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
        from transformers import Gemma2Config, Gemma2Model

        from .tiny import tiny_tokenizer

        tok = tiny_tokenizer(max_length=512)
        gemma = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id))
        transformer = SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
            sample_size=16, patch_size=1)
        vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=8,
                            encoder_block_types=("ResBlock", "ResBlock"), decoder_block_types=("ResBlock", "ResBlock"),
                            encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
                            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                            encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
                            decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
        sched = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
        SanaPipeline(tokenizer=tok, text_encoder=gemma, vae=vae, transformer=transformer,
                     scheduler=sched).save_pretrained(out, safe_serialization=True)
