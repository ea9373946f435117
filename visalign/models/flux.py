"""FLUX.1 (dev and schnell): FluxTransformer2DModel over packed 2x2 latent patches, CLIP-pooled + T5 text.

The flow conventions are SD3's (``FlowBackbone``): x_t = (1−σ)x0 + σε, target v = ε − x0, t = 1000σ, the
Flow-GRPO SDE for log-densities and Euler inversion. What differs, as ``FluxPipeline`` does it:

- latents [C, H, W] are packed into (H/2)(W/2) tokens of 4C channels around each forward (the methods
  see unpacked latents, like every other family's), with image position ids (0, row, col) and zero text ids;
- the sampling grid is σ = linspace(1, 1/N, N), shifted by the resolution-dependent μ
  (``calculate_shift``: σ' = e^μ / (e^μ + 1/σ − 1)) when the scheduler uses dynamic shifting; the training
  density is the same logit-normal as SD3's, shifted with the same e^μ at the training resolution;
- **guidance is distilled.** FLUX.1-dev takes the guidance scale as an *input* (a guidance embedding),
  not as classifier-free guidance: sampling feeds ``train.guidance`` (or the sampler's) into the embedding
  in one forward, and the training losses evaluate the model at ``guidance_embed`` (3.5, as flow_grpo and
  DanceGRPO train FLUX.1-dev). Online methods sample and score their log-densities at the same value, so
  the ratio is still exactly 1 on-policy. FLUX.1-schnell has no guidance input at all and samples in about
  4 steps without shift (its scheduler says so); guidance values are ignored for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..registry import register_preset
from .backbone import Cond, register_family
from .flow import FlowBackbone
from .load import load_diffusers, load_transformers
from .quantize import quantization_kwargs
from .unet import tokenize


def pack(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: 2x2 patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of ``pack`` for a latent of height ``h`` and width ``w``."""
    b, _, ch = tokens.shape
    return tokens.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> Tensor:
    """Position ids (0, row, col) of the (h/2)(w/2) packed tokens."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def resolution_shift(scheduler_config: dict, tokens: int) -> float:
    """μ of FluxPipeline's ``calculate_shift``: linear in the image's token count between two anchors."""
    base, top = scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096)
    lo, hi = scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15)
    slope = (hi - lo) / (top - base)
    return tokens * slope + lo - slope * base


def packed_shifts(scheduler_config: dict, tokens: int) -> tuple[float, float]:
    """(μ, the training density's shift): the sampler's own at this resolution (e^μ when shifting dynamically)."""
    mu = resolution_shift(scheduler_config, tokens)
    dynamic = scheduler_config.get("use_dynamic_shifting", False)
    return mu, math.exp(mu) if dynamic else float(scheduler_config.get("shift", 1.0))


def packed_grid_scheduler(scheduler_config: dict, steps: int, device, mu: float):
    """FluxPipeline's (and QwenImagePipeline's) grid: σ = linspace(1, 1/N, N), shifted by μ or the config's shift."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps, device=device, sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
    return sched


# Flow-DPO's beta as SD3's (velocity errors on the same scale); LoRA lr and bf16 as flow_grpo/DanceGRPO's Flux
# runs. dev samples at guidance 3.5 (FluxPipeline's default) over 28 steps; schnell at 4 steps.
register_preset("flux", {"model": {"name": "flux", "path": "black-forest-labs/FLUX.1-dev"},
                         "objective": {"name": "diffusion_dpo", "beta": 100.0},
                         "train": {"lr": 1e-5, "mixed_precision": "bf16", "gradient_checkpointing": True,
                                   "guidance": 3.5, "sample_steps": 28}})
register_preset("flux-schnell", {"model": {"name": "flux", "path": "black-forest-labs/FLUX.1-schnell"},
                                 "objective": {"name": "diffusion_dpo", "beta": 100.0},
                                 "train": {"lr": 1e-5, "mixed_precision": "bf16", "gradient_checkpointing": True,
                                           "sample_steps": 4}})


# guidance: FLUX.1-dev's usual guidance-embedding value (schnell ignores it); tiny: toy dev (guidance input,
# dynamic shift) and schnell layouts
@register_family("flux", pipeline="FluxPipeline", guidance=3.5, tiny=("flux", "flux-schnell"),
                 tiny_kwargs={"max_sequence_length": 8, "resolution": 32})
class FluxBackbone(FlowBackbone):
    """FLUX.1-dev / -schnell: rectified flow on packed latents; guidance is an input (dev) or none (schnell)."""

    true_cfg = False

    @staticmethod
    def build_tiny(variant: str, out) -> None:
        build_tiny_flux(out, schnell=variant == "flux-schnell")

    def __init__(self, path: str, resolution: int = 1024, logit_mean: float = 0.0, logit_std: float = 1.0,
                 max_sequence_length: int = 512, guidance_embed: float = 3.5, revision: str | None = None,
                 load_encoders: bool = True,
                 quantize: str = "none"):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        kw = {"revision": revision} if revision else {}
        self.denoiser = load_diffusers(FluxTransformer2DModel, path, "transformer", what="transformer",
                                      **kw, **quantization_kwargs(quantize))
        self.vae = self.text_encoder = self.tokenizer = self.t5 = self.t5_tokenizer = None
        if load_encoders:
            self.vae = load_diffusers(AutoencoderKL, path, "vae", what="VAE", **kw).eval().requires_grad_(False)
            self.text_encoder = load_transformers(CLIPTextModel, path, "text_encoder", what="CLIP text encoder",
                                                  **kw).eval().requires_grad_(False)
            self.tokenizer = load_transformers(AutoTokenizer, path, "tokenizer", what="tokenizer")
            self.t5 = load_transformers(T5EncoderModel, path, "text_encoder_2", what="T5", **kw).eval()
            self.t5.requires_grad_(False)
            self.t5_tokenizer = load_transformers(AutoTokenizer, path, "tokenizer_2", what="T5 tokenizer")
        self.scheduler_config = dict(load_diffusers(FlowMatchEulerDiscreteScheduler, path, "scheduler",
                                                    what="scheduler").config)
        vae_cfg = self.vae.config if self.vae is not None else AutoencoderKL.load_config(path, subfolder="vae")
        factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        if resolution % (2 * factor):
            raise ValueError(f"model.resolution={resolution}: FLUX needs a multiple of {2 * factor} "
                             "(VAE factor x 2x2 packing)")
        self.resolution, self.path = resolution, path
        side = resolution // factor
        self.sample_shape = (int(vae_cfg["latent_channels"]), side, side)
        self.tokens = (side // 2) ** 2
        self.num_train_timesteps = int(self.scheduler_config["num_train_timesteps"])
        self.mu, self.shift = packed_shifts(self.scheduler_config, self.tokens)
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.max_sequence_length, self.guidance_embed = max_sequence_length, guidance_embed
        self.has_guidance_input = bool(self.denoiser.config.guidance_embeds)

    def encode_prompts(self, prompts: Sequence[str], image_meta: dict | None = None) -> Cond:
        """CLIP's pooled output (``pooled``) and T5's last hidden states padded to max_sequence_length."""
        pooled = self.text_encoder(tokenize(self.tokenizer, prompts, self.text_encoder.device)).pooler_output
        ids = self.t5_tokenizer(list(prompts), padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, return_tensors="pt").input_ids.to(self.t5.device)
        return Cond({"hidden": self.t5(ids)[0], "pooled": pooled})

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond, guidance: float | None = None) -> Tensor:
        """The velocity at (x_t, t); dev's guidance input is ``guidance`` (default ``guidance_embed``)."""
        model, x_in, t, cond = self.denoiser_inputs(x_t, t, cond)
        b, _, h, w = x_in.shape
        hidden = cond.tensors["hidden"]
        g = None
        if self.has_guidance_input:
            g = torch.full((b,), self.guidance_embed if guidance is None else guidance, device=x_in.device,
                           dtype=torch.float32)
        out = model(hidden_states=pack(x_in), timestep=(t.float() / self.num_train_timesteps).to(x_in.dtype),
                    guidance=g, pooled_projections=cond.tensors["pooled"], encoder_hidden_states=hidden,
                    txt_ids=torch.zeros(hidden.shape[1], 3, device=x_in.device, dtype=x_in.dtype),
                    img_ids=image_ids(h, w, x_in.device, x_in.dtype)).sample
        return unpack(out, h, w).to(x_t.dtype)

    def guided(self, x: Tensor, t: Tensor, cond: Cond, uncond: Cond | None, guidance: float) -> Tensor:
        """Distilled guidance: one forward with ``guidance`` as dev's input (schnell: none); no CFG."""
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.predict(x, t, cond, guidance=guidance)

    def sampling_scheduler(self, steps: int):
        return packed_grid_scheduler(self.scheduler_config, steps, self.device, self.mu)


def build_tiny_flux(out, schnell: bool = False):
    """FLUX.1-dev's layout (guidance input, dynamic shift) or schnell's (neither), at toy width."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from .tiny import tiny_clip_config, tiny_t5, tiny_tokenizer, tiny_vae

    tok = tiny_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=not schnell,
                                         axes_dims_rope=(2, 2, 4))
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0) if schnell else FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
        max_shift=1.15)
    pipe = FluxPipeline(scheduler=sched, vae=tiny_vae(shift=True), text_encoder=CLIPTextModel(tiny_clip_config(tok)),
                        tokenizer=tok, text_encoder_2=tiny_t5(tok), tokenizer_2=tiny_tokenizer(max_length=512),
                        transformer=transformer)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


# Kohya / ComfyUI naming of a FLUX LoRA (sd-scripts' networks/lora_flux.py, Black Forest Labs' module names):
# lora_unet_{double_blocks_I_img_attn_qkv, ...}. Diffusers' separate q/k/v (and the single blocks' MLP input)
# are one fused Linear there, so their adapters are stacked block-diagonally (below).
_DOUBLE = {"attn.to_out.0": "img_attn_proj", "attn.to_add_out": "txt_attn_proj", "ff.net.0.proj": "img_mlp_0",
           "ff.net.2": "img_mlp_2", "ff_context.net.0.proj": "txt_mlp_0", "ff_context.net.2": "txt_mlp_2",
           "norm1.linear": "img_mod_lin", "norm1_context.linear": "txt_mod_lin"}
_DOUBLE_FUSED = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation_lin"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer_linear",
        "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in_out_layer"}
MLP_RATIO = 4  # FLUX's single-block MLP width over the model width: proj_mlp's share of linear1


def _fuse(parts: list[tuple[Tensor, Tensor] | None], in_dim: int, rank: int) -> tuple[Tensor, Tensor]:
    """Adapters (A_j [r, in], B_j [d_j, r]) of the parts of one fused Linear -> (down [k r, in], up [Σd_j, k r])
    with up block-diagonal, so up @ down = concat_j(B_j A_j); an untrained part contributes zeros."""
    dims = [in_dim * MLP_RATIO if p is None and j == 3 else (p[1].shape[0] if p else in_dim)
            for j, p in enumerate(parts)]
    down = torch.zeros(len(parts) * rank, in_dim)
    up = torch.zeros(sum(dims), len(parts) * rank)
    row = 0
    for j, (p, d) in enumerate(zip(parts, dims)):
        if p is not None:
            down[j * rank:(j + 1) * rank] = p[0]
            up[row:row + d, j * rank:(j + 1) * rank] = p[1]
        row += d
    return down, up


def flux_kohya(adapters: dict[str, tuple[Tensor, Tensor]], alpha: float) -> dict[str, Tensor]:
    """Diffusers-module adapters {``transformer_blocks.0.attn.to_q``: (A, B)} -> Kohya keys with ``.alpha``.

    The scale alpha/r is folded into ``up`` and every ``.alpha`` equals its module's rank (k r for a fused
    one), so each reader computes the trained update whatever it does with alpha (diffusers' FLUX reader
    ignores the final layer's alpha, for one)."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def put(name: str, down: Tensor, up: Tensor) -> None:
        out[f"lora_unet_{name}.lora_down.weight"], out[f"lora_unet_{name}.lora_up.weight"] = down, up
        out[f"lora_unet_{name}.alpha"] = torch.tensor(float(down.shape[0]))

    for module, name in _TOP.items():
        if module in adapters:
            a, b = adapters[module]
            put(name, a, b * (alpha / a.shape[0]))
            used.add(module)
    blocks = {(m.split(".")[0], int(m.split(".")[1])) for m in adapters if m.split(".")[0].endswith("_blocks")}
    for kind, i in sorted(blocks):
        plain, fused, bfl = ((_DOUBLE, _DOUBLE_FUSED, "double_blocks") if kind == "transformer_blocks"
                             else (_SINGLE, _SINGLE_FUSED, "single_blocks"))
        for module, name in plain.items():
            if (key := f"{kind}.{i}.{module}") in adapters:
                a, b = adapters[key]
                put(f"{bfl}_{i}_{name}", a, b * (alpha / a.shape[0]))
                used.add(key)
        for name, modules in fused.items():
            keys = [f"{kind}.{i}.{m}" for m in modules]
            parts = [adapters.get(k) for k in keys]
            if any(parts):
                a, _ = next(p for p in parts if p)
                down, up = _fuse(parts, a.shape[1], a.shape[0])
                put(f"{bfl}_{i}_{name}", down, up * (alpha / a.shape[0]))
                used.update(k for k in keys if k in adapters)
    if missing := sorted(set(adapters) - used):
        raise ValueError(f"no Kohya name for the FLUX modules {', '.join(missing[:4])}")
    return out
