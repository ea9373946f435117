"""SD3-style flow-matching backbone: SD3Transformer2DModel + FlowMatchEulerDiscreteScheduler (rectified flow)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import register_preset
from .backbone import (
    BackboneBase,
    Cond,
    Noised,
    SampleOutput,
    gaussian_logprob_mean,
    gaussian_step,
    no_density,
    register_family,
    sample_output,
    step_etas,
)
from .load import load_diffusers, load_transformers
from .quantize import quantization_kwargs
from .unet import LatentMixin, tokenize

register_preset("sd3", {"model": {"name": "sd3", "path": "stabilityai/stable-diffusion-3.5-medium"},
                        "objective": {"name": "diffusion_dpo", "beta": 100.0},
                        "train": {"lr": 1e-5, "mixed_precision": "bf16"}})


@register_family("sd3", pipeline="StableDiffusion3Pipeline", guidance=4.5, lora=("StableDiffusion3Pipeline",
                 "transformer"), tiny=("sd3",), tiny_kwargs={"max_sequence_length": 8})
class FlowBackbone(LatentMixin, BackboneBase):
    """SD3: x_t = (1−σ)x0 + σε, target v = ε − x0, σ from a shifted logit-normal density; t = 1000σ."""

    @staticmethod
    def build_tiny(variant: str, out, **kwargs) -> None:
        tiny_sd3(out, **kwargs)

    denoiser_subfolder = "transformer"

    def __init__(self, path: str, resolution: int | None = None, logit_mean: float = 0.0,
                 logit_std: float = 1.0, max_sequence_length: int = 256, use_t5: bool = True,
                 revision: str | None = None, load_encoders: bool = True,
                 quantize: str = "none"):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        kw = {"revision": revision} if revision else {}
        self.denoiser = load_diffusers(SD3Transformer2DModel, path, "transformer", what="transformer",
                                      **kw, **quantization_kwargs(quantize))
        self.vae = None
        if load_encoders:
            self.vae = load_diffusers(AutoencoderKL, path, "vae", what="VAE", **kw).eval().requires_grad_(False)
        self.text_encoders, self.tokenizers = [], []
        for i in ("", "_2") if load_encoders else ():
            self.text_encoders.append(load_transformers(
                CLIPTextModelWithProjection, path, f"text_encoder{i}", what=f"text_encoder{i}", **kw
            ).eval().requires_grad_(False))
            self.tokenizers.append(load_transformers(AutoTokenizer, path, f"tokenizer{i}", what=f"tokenizer{i}"))
        self.t5 = self.t5_tokenizer = None
        if load_encoders and use_t5 and _has(path, "text_encoder_3"):
            from transformers import T5EncoderModel

            self.t5 = load_transformers(T5EncoderModel, path, "text_encoder_3", what="T5", **kw).eval()
            self.t5.requires_grad_(False)
            self.t5_tokenizer = load_transformers(AutoTokenizer, path, "tokenizer_3", what="T5 tokenizer")
        self.scheduler_config = dict(load_diffusers(FlowMatchEulerDiscreteScheduler, path, "scheduler",
                                                    what="scheduler").config)
        self.shift = float(self.scheduler_config.get("shift", 1.0))
        self.num_train_timesteps = int(self.scheduler_config["num_train_timesteps"])
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.max_sequence_length = max_sequence_length
        self.path = path
        vae_cfg = self.vae.config if self.vae is not None else AutoencoderKL.load_config(path, subfolder="vae")
        factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        self.resolution = resolution or self.denoiser.config.sample_size * factor
        c = self.denoiser.config.in_channels
        self.sample_shape = (c, self.resolution // factor, self.resolution // factor)

    def text_encoders_for_lora(self) -> dict[str, torch.nn.Module]:
        if "text_encoders" not in vars(self):  # a subclass family (FLUX, Sana) names its encoders itself
            return super().text_encoders_for_lora()
        return {name: enc for name, enc in zip(("text_encoder", "text_encoder_2"), self.text_encoders)}

    def encode_prompts(self, prompts: Sequence[str], image_meta: dict | None = None) -> Cond:
        hidden, pooled = [], []
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            out = enc(tokenize(tok, prompts, enc.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, -1)
        joint = self.denoiser.config.joint_attention_dim
        clip = F.pad(clip, (0, joint - clip.shape[-1]))
        if self.t5 is not None:
            ids = self.t5_tokenizer(list(prompts), padding="max_length", max_length=self.max_sequence_length,
                                    truncation=True, return_tensors="pt").input_ids.to(self.t5.device)
            t5 = self.t5(ids)[0]
        else:  # as the SD3 pipeline does without T5: zero tokens
            t5 = torch.zeros(len(prompts), self.max_sequence_length, joint, device=clip.device, dtype=clip.dtype)
        return Cond({"hidden": torch.cat([clip, t5], -2), "pooled": torch.cat(pooled, -1)})

    def _shifted(self, u: Tensor) -> Tensor:
        return self.shift * u / (1 + (self.shift - 1) * u)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        u = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator))
        return (self._shifted(u) * self.num_train_timesteps).to(self.device)

    def noise(self, x0: Tensor, t: Tensor | None = None, eps: Tensor | None = None,
              generator: torch.Generator | None = None) -> Noised:
        """x_t = (1−σ)x0 + σε with σ = t/1000; target = ε − x0 (the velocity the transformer predicts)."""
        t, eps = self.noise_inputs(x0, t, eps, generator)
        t = t.float()
        sigma = (t / self.num_train_timesteps).view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return Noised(x_t=(1 - sigma) * x0 + sigma * eps, t=t, target=eps - x0)

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        model, x_in, t, cond = self.denoiser_inputs(x_t, t, cond)
        return model(hidden_states=x_in, timestep=t, encoder_hidden_states=cond.tensors["hidden"],
                     pooled_projections=cond.tensors["pooled"]).sample.to(x_t.dtype)

    def x0_prediction(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x̂0 = x_t − σ·v̂ (x_t = (1−σ)x0 + σε, v = ε − x0), σ = t/1000."""
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        sigma = (t.float() / self.num_train_timesteps).to(x_t.device).view(-1, *([1] * (x_t.ndim - 1)))
        return x_t - sigma.to(x_t.dtype) * pred

    def sampling_scheduler(self, steps: int):
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        sched.set_timesteps(steps, device=self.device)
        return sched

    def sde_mean_std(self, v: Tensor, x: Tensor, sigma: Tensor, sigma_prev: Tensor, eta: float,
                     sigma_max: float) -> tuple[Tensor, Tensor]:
        """Mean and std of Flow-GRPO's SDE step from σ to σ_prev (Liu et al. 2025, Eq. 9)."""
        shape = (-1, *([1] * (x.ndim - 1)))
        s, sp = sigma.view(shape).to(x.dtype), sigma_prev.view(shape).to(x.dtype)
        dt = sp - s
        s_safe = torch.where(s >= 1, torch.full_like(s, sigma_max), s)
        std_t = (s / (1 - s_safe)).sqrt() * eta
        mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        return mean, std_t * (-dt).sqrt()

    def _sigma_pair(self, sched, t: Tensor) -> tuple[Tensor, Tensor]:
        idx = torch.stack([(sched.timesteps - ti).abs().argmin() for ti in t.reshape(-1)])
        return sched.sigmas[idx].to(t.device), sched.sigmas[idx + 1].to(t.device)

    @torch.no_grad()
    def _sample(self, prompts, steps, guidance, generator, trajectory, eta, latents, image_meta) -> SampleOutput:
        n = len(prompts)
        sched = self.sampling_scheduler(steps)
        x = latents if latents is not None else torch.randn((n, *self.sample_shape), generator=generator)
        x = x.to(self.device)
        cond = self.encode_prompts(prompts)
        uncond = self.unconditional(n, guidance)
        traj, logps = [x], []
        sigma_max = float(sched.sigmas[1])
        etas = step_etas(eta, len(sched.timesteps))
        stochastic = trajectory and max(etas) > 0  # a density per step; NaN on a deterministic one
        for i, t in enumerate(sched.timesteps):
            v = self.guided(x, t, cond, uncond, guidance)
            if stochastic and etas[i] > 0:
                s, sp = sched.sigmas[i].expand(n), sched.sigmas[i + 1].expand(n)
                mean, std = self.sde_mean_std(v, x, s, sp, etas[i], sigma_max)
                x, logp = gaussian_step(mean, std, generator)
                logps.append(logp)
            elif stochastic:  # the ODE's Euler step, by hand: the scheduler's step counter skips SDE steps
                x = x + (sched.sigmas[i + 1] - sched.sigmas[i]).to(x) * v.to(x.dtype)
                logps.append(no_density(x))
            else:
                x = sched.step(v, t, x).prev_sample
            if trajectory:
                traj.append(x)
        return sample_output(self, x, traj, logps, sched.timesteps, trajectory)

    def step_logprob(self, x_t: Tensor, x_prev: Tensor, t: Tensor, cond: Cond, *, steps: int,
                     eta: float = 0.7, uncond: Cond | None = None, guidance: float = 1.0) -> Tensor:
        """Per-image mean log-density of the SDE step x_t → x_prev under the current model (Flow-GRPO)."""
        sched = self.sampling_scheduler(steps)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        s, sp = self._sigma_pair(sched, t)
        v = self.guided(x_t, t, cond, uncond, guidance)
        mean, std = self.sde_mean_std(v, x_t, s, sp, eta, float(sched.sigmas[1]))
        return gaussian_logprob_mean(x_prev, mean, std)

    @torch.no_grad()
    def invert(self, x0: Tensor, cond: Cond, steps: int = 10, until: Tensor | float | None = None,
               eta: float = 0.0, renoise: int = 0, generator: torch.Generator | None = None,
               path: list | None = None) -> tuple[Tensor, Tensor]:
        """Euler inversion of the flow ODE from σ = 0 up the sampling grid (reverse of ``sample``).

        ``until`` (per image or one value, in timestep units 1000σ) stops each image early;
        ``renoise`` averages velocities at the provisional next point (ReNoise); ``eta`` adds noise;
        ``path``, when given, receives each grid step's latent.
        """
        sched = self.sampling_scheduler(steps)
        sigmas = sched.sigmas.flip(0).cpu()  # ascending: 0, ..., σ_max
        n = x0.shape[0]
        limit = torch.full((n,), float("inf")) if until is None else torch.as_tensor(until).float().cpu().expand(n)
        x, reached = x0, torch.zeros(n)
        shape = (-1, *([1] * (x0.ndim - 1)))
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            active = limit >= float(s_next) * self.num_train_timesteps - 1e-3
            if not bool(active.any()):
                break
            t_vec = (s * self.num_train_timesteps).expand(n).to(x.device)
            v = self.predict(x, t_vec, cond)
            x_new = x + (s_next - s).to(x) * v
            for _ in range(renoise):
                v = 0.5 * (v + self.predict(x_new, (s_next * self.num_train_timesteps).expand(n).to(x.device), cond))
                x_new = x + (s_next - s).to(x) * v
            if eta > 0:
                x_new = x_new + eta * float(s_next - s) ** 0.5 * torch.randn(x.shape, generator=generator).to(x)
            x = torch.where(active.to(x.device).view(shape), x_new, x)
            reached = torch.where(active, torch.full_like(reached, float(s_next) * self.num_train_timesteps), reached)
            if path is not None:
                path.append(x)
        return x, reached.to(x0.device)

    def inversion_grid(self, steps: int) -> Tensor:
        return (self.sampling_scheduler(steps).sigmas.flip(0)[1:] * self.num_train_timesteps).cpu()

    def eps_from_xt(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """ε̂ with x_t = (1−σ)x0 + σε̂, σ = t/1000."""
        sigma = (t.float() / self.num_train_timesteps).to(x0.device).view(-1, *([1] * (x0.ndim - 1)))
        return (x_t - (1 - sigma) * x0) / sigma.clamp_min(1e-6)


def _has(path: str, sub: str) -> bool:
    from pathlib import Path

    p = Path(path)
    return (p / sub).exists() if p.exists() else True


def tiny_sd3(out):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from .tiny import tiny_clip_config, tiny_tokenizer, tiny_vae

    tok = tiny_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(shift=True),
        text_encoder=CLIPTextModelWithProjection(tiny_clip_config(tok)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(tiny_clip_config(tok)), tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
