"""The one interface every model family implements, and the shared machinery of diffusers backbones."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..registry import BACKBONES
from .cond import Cond, Noised, SampleOutput  # noqa: F401  (re-exported: families import them here)
from .reference import ReferenceMixin


@runtime_checkable
class Backbone(Protocol):
    """What methods and the trainer may ask of a model; only ``visalign.models`` knows diffusers.

    Every registered family implements it (``tests/test_family_contract.py`` checks each one on its tiny
    folder); optional capabilities (``invert``, ``step_logprob``) are declared by the methods that need them.
    """

    denoiser: torch.nn.Module
    family: str
    sample_shape: tuple[int, ...]  # one model-space sample: latent [C, h, w] or pixels [3, H, W]
    resolution: int  # image side in pixels
    num_train_timesteps: int
    device: torch.device

    # the model: the trainable module (LoRA-wrapped or not), device moves, eval mode while sampling
    def unwrapped(self) -> torch.nn.Module: ...
    def to_device(self, device, include_denoiser: bool = False) -> None: ...
    def sampling_mode(self) -> contextlib.AbstractContextManager: ...
    # the reference: adapters off (LoRA) or a frozen copy (full fine-tuning, Curry-DPO stages, online rounds)
    def reference(self) -> contextlib.AbstractContextManager: ...
    def freeze_reference_copy(self, dtype: torch.dtype | None = None) -> None: ...
    # a second LoRA module beside the policy's (OFS-DPO's slow one), and running it instead
    def add_twin_adapter(self, name: str) -> list[torch.nn.Parameter]: ...
    def adapter(self, name: str) -> contextlib.AbstractContextManager: ...
    # text, images and the diffusion process

    def encode_prompts(self, prompts: Sequence[str], image_meta: dict | None = None) -> Cond: ...
    def encode_for_training(self, prompts: Sequence[str], image_meta: dict | None = None) -> Cond: ...
    def unconditional(self, n: int, guidance: float, image_meta: dict | None = None) -> Cond | None: ...
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor: ...
    def latent_moments(self, images: Tensor) -> tuple[Tensor, Tensor | None]: ...
    def decode(self, x0: Tensor) -> Tensor: ...
    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...
    def noise(self, x0: Tensor, t: Tensor | None = None, eps: Tensor | None = None,
              generator: torch.Generator | None = None) -> Noised: ...
    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor: ...
    # x̂0 implied by a prediction (ε, v or flow velocity), unclipped: affine in ``pred`` (DiffusionNFT's loss space)
    def x0_prediction(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor: ...
    def error(self, noised: Noised, cond: Cond) -> Tensor: ...
    def sample(self, prompts: Sequence[str], steps: int = 20, guidance: float = 3.0, *,
               generator: torch.Generator | None = None, trajectory: bool = False, eta: float = 0.0,
               latents: Tensor | None = None) -> SampleOutput: ...
    def save_full(self, out, extra: dict[str, dict] | None = None) -> str: ...


def per_image_mse(pred: Tensor, target: Tensor) -> Tensor:
    """e = mean over all but the batch axis of (pred − target)², in float32 (the canonical convention)."""
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(1)


def gaussian_logprob_mean(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-image mean over elements of log N(x; mean, std²) (D3PO's convention: mean, not sum)."""
    std = std.float()
    lp = (-((x.float() - mean.float()) ** 2) / (2 * std**2) - torch.log(std)
          - 0.5 * torch.log(torch.tensor(2 * torch.pi)))
    return lp.flatten(1).mean(1)


def gaussian_step(mean: Tensor, std: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """x ~ N(mean, std²) and its per-image mean log-density: the stochastic step of a sampled trajectory."""
    x = mean + std * torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
    return x, gaussian_logprob_mean(x, mean, std)


def step_etas(eta: float | Sequence[float], steps: int) -> list[float]:
    """The sampler's η per step: a scalar for every step, or one per step (a noisy window: η > 0 on the steps
    a policy gradient trains, 0, the ODE, elsewhere; MixGRPO, Flow-GRPO-Fast)."""
    if isinstance(eta, (int, float)):
        return [float(eta)] * steps
    etas = [float(e) for e in eta]
    if len(etas) != steps:
        raise ValueError(f"eta: {len(etas)} values for {steps} sampler steps")
    return etas


def no_density(x: Tensor) -> Tensor:
    """The log-density column of a deterministic step inside a stochastic trajectory: NaN, none exists."""
    return torch.full((x.shape[0],), float("nan"), device=x.device)


def sample_output(backbone, x: Tensor, traj: list[Tensor], logps: list[Tensor], timesteps: Tensor,
                  trajectory: bool) -> SampleOutput:
    return SampleOutput(images=backbone.decode(x), latents=x, trajectory=traj if trajectory else None,
                        timesteps=timesteps.clone() if trajectory else None,
                        log_probs=torch.stack(logps, 1) if logps else None)


def register_family(name: str, *, pipeline: str, guidance: float, lora: tuple[str, str] | None = None,
                    tiny: tuple[str, ...] = (), tiny_kwargs: dict | None = None):
    """Register a backbone class as the family ``name`` and declare, beside its code, what generic code asks
    of it: the model_index.json ``pipeline`` class that names the family, its usual CFG ``guidance`` (when a
    folder declares none), the diffusers pipeline whose ``save_lora_weights`` writes its LoRA and the key
    prefix (``lora``; default: its own pipeline, the inherited prefix), its ``tiny`` test folders
    (models/tiny.py builds them with the class's ``build_tiny``) and the model kwargs they load with."""
    def declare(cls):
        cls.family, cls.pipeline_class, cls.default_guidance = name, pipeline, guidance
        cls.lora_pipeline, cls.lora_prefix = lora or (pipeline, cls.lora_prefix)
        cls.tiny_variants, cls.tiny_kwargs = tiny, dict(tiny_kwargs or {})
        return BACKBONES.register(name)(cls)

    return declare


class BackboneBase(ReferenceMixin):
    """The shared machinery of diffusers-backed families: sampling with guidance, device moves, the
    per-image error, full-model saving; the reference comes from ``ReferenceMixin``."""

    sample_dtype: torch.dtype | None = None  # e.g. torch.bfloat16: sample under autocast (2x on AMX CPUs)
    # train.rollout_precision: online rounds sample, and ratio methods recompute their log-densities, under
    # this autocast (one precision and code path for π_old and π_θ, so the ratio is 1 before an update)
    rollout_dtype: torch.dtype | None = None
    # what a family declares beside its code: the model_index.json class naming it, its tiny test folders
    # (models/tiny.py) and the model kwargs they load with
    pipeline_class: str = ""
    lora_prefix: str = "unet"
    tiny_variants: tuple[str, ...] = ()
    tiny_kwargs: dict = {}

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], steps: int = 20, guidance: float = 3.0, *,
               generator: torch.Generator | None = None, trajectory: bool = False, eta: float = 0.0,
               latents: Tensor | None = None, image_meta: dict | None = None) -> SampleOutput:
        """Generate with classifier-free guidance (under ``sample_dtype`` autocast when set); images in [0, 1]."""
        if latents is not None:  # callers make seeded noise on the CPU so that samples match across devices
            latents = latents.to(self.device)
        with self.sampling_autocast():
            out = self._sample(prompts, steps, guidance, generator, trajectory, eta, latents, image_meta)
        out.images = out.images.float()
        return out

    def noise_inputs(self, x0: Tensor, t: Tensor | None, eps: Tensor | None,
                     generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(t, ε) for ``noise``, drawn when not given (ε seeded over an explicit shape), t on x0's device."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], generator)
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        return t.to(x0.device), eps

    def denoiser_inputs(self, x_t: Tensor, t: Tensor, cond: Cond) -> tuple[torch.nn.Module, Tensor, Tensor, Cond]:
        """(the active denoiser, its input, t per sample, cond) for one ``predict``."""
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        model = self.active_denoiser()
        x_in, cond = self._inputs_for(model, x_t, cond)
        return model, x_in, t, cond

    @contextlib.contextmanager
    def sampling_mode(self):
        """The denoiser in eval mode for the block (sampling mid-training), its training mode restored after."""
        model = self.unwrapped()
        was_training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)

    def sampling_autocast(self):
        """Autocast for sampling when ``sample_dtype`` is set (training precision is accelerate's business)."""
        if self.sample_dtype is None:  # no autocast object at all: not every device type has one
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.sample_dtype)

    @contextlib.contextmanager
    def rollout_sampling(self):
        """Sampling in the block under the rollouts' precision (``rollout_dtype``): an online round's sampler."""
        saved = self.sample_dtype
        self.sample_dtype = self.rollout_dtype if self.rollout_dtype is not None else saved
        try:
            yield
        finally:
            self.sample_dtype = saved

    def rollout_autocast(self):
        """The autocast the rollouts sampled under, for the forwards that recompute their log-densities."""
        if self.rollout_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.rollout_dtype)

    def unwrapped(self) -> torch.nn.Module:
        m = self.denoiser
        while hasattr(m, "module"):
            m = m.module
        return getattr(m, "_orig_mod", m)

    def modules(self) -> dict[str, torch.nn.Module]:
        """Every torch module the backbone holds (denoiser, encoders, VAE, reference copy)."""
        out = {}
        for k, v in vars(self).items():
            if isinstance(v, torch.nn.Module):
                out[k] = v
            elif isinstance(v, list) and v and all(isinstance(m, torch.nn.Module) for m in v):
                out |= {f"{k}.{i}": m for i, m in enumerate(v)}
        return out

    def to_device(self, device, include_denoiser: bool = False) -> None:
        """Move the modules to ``device``; in training the denoiser is left to accelerate's ``prepare``."""
        for name, m in self.modules().items():
            if include_denoiser or name != "denoiser":
                m.to(device)

    denoiser_subfolder = "unet"

    def save_full(self, out, extra: dict[str, dict] | None = None) -> str:
        """A full fine-tune as a pipeline folder: the base folder's other parts plus the trained denoiser, and
        ``extra`` JSON files (name -> content); built in a temporary folder, then renamed."""
        import json
        import shutil
        from pathlib import Path

        out = Path(out)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        src = Path(getattr(self, "path", ""))
        if src.is_dir():
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(self.denoiser_subfolder))
        self.unwrapped().save_pretrained(tmp / self.denoiser_subfolder, safe_serialization=True)
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return str(out)

    @property
    def device(self) -> torch.device:
        return next(self.unwrapped().parameters()).device

    def error(self, noised: Noised, cond: Cond) -> Tensor:
        """Per-image mean squared error of the model's prediction against its own target: [N]."""
        return per_image_mse(self.predict(noised.x_t, noised.t, cond), noised.target)

    true_cfg: bool = True  # False where guidance is a model input (FLUX.1-dev) or distilled away (schnell)

    def unconditional(self, n: int, guidance: float, image_meta: dict | None = None) -> Cond | None:
        """The empty prompt's conditioning for classifier-free guidance at ``guidance``; None when unused."""
        if guidance == 1.0 or not self.true_cfg:
            return None
        return self.encode_prompts([""] * n, image_meta)

    def guided(self, x: Tensor, t: Tensor, cond: Cond, uncond: Cond | None, guidance: float) -> Tensor:
        """Classifier-free guidance u + w(c − u) in one batched forward; t is a scalar or one per image."""
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if uncond is None or guidance == 1.0:
            return self.predict(x, t, cond)
        u, c = self.predict(torch.cat([x, x]), torch.cat([t, t]), Cond.cat([uncond, cond])).chunk(2)
        return u + guidance * (c - u)
