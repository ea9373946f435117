"""Shared code of the discrete-time ε / v backbones (SD 1.x/2.x, SDXL, pixel): noising, DDIM, inversion."""

from __future__ import annotations

import torch
from torch import Tensor

from .backbone import (
    BackboneBase,
    Cond,
    Noised,
    SampleOutput,
    gaussian_logprob_mean,
    gaussian_step,
    no_density,
    sample_output,
    step_etas,
)
from .kdiff import k_split, k_target, velocity_error


def denoising_target(scheduler, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """What the denoiser learns to predict: ε, or v = √ᾱ_t ε − √(1−ᾱ_t) x0 (Salimans & Ho 2022, Eq. 13)."""
    return eps if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, t)


class DiffusionBackbone(BackboneBase):
    """A denoiser with a DDPM noise schedule predicting ε or v (from the scheduler's ``prediction_type``), or
    k-Diff's y_k when the folder declares a k (``kdiff_k``; the error is then measured in v-space, as trained).

    Subclasses provide ``encode_prompts``, ``encode_images``, ``decode`` and ``_forward`` (how their
    denoiser takes the conditioning). Timesteps are integers in [0, T).
    """

    family = "diffusion"

    def __init__(self, denoiser: torch.nn.Module, scheduler_config: dict, sample_shape: tuple[int, ...],
                 kdiff_k: float | None = None):
        from diffusers import DDPMScheduler

        self.denoiser = denoiser
        self.scheduler_config = dict(scheduler_config)
        self.train_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.prediction_type = self.train_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not supported "
                             "(expected 'epsilon' or 'v_prediction')")
        self.kdiff_k = kdiff_k
        if kdiff_k is not None:
            self.prediction_type = "k"
        self.num_train_timesteps = int(self.train_scheduler.config.num_train_timesteps)
        self.alphas_cumprod = self.train_scheduler.alphas_cumprod.float()
        self.sample_shape = tuple(sample_shape)

    # --- subclass hooks -------------------------------------------------------------------------
    def _forward(self, model: torch.nn.Module, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return model(x_t, t, encoder_hidden_states=cond.tensors["hidden"]).sample

    # --- training ------------------------------------------------------------------------------
    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(self.device)

    def noise(self, x0: Tensor, t: Tensor | None = None, eps: Tensor | None = None,
              generator: torch.Generator | None = None) -> Noised:
        """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε; target ε or v = √ᾱ_t ε − √(1−ᾱ_t) x0, as the model predicts."""
        t, eps = self.noise_inputs(x0, t, eps, generator)
        x_t = self.train_scheduler.add_noise(x0, eps, t)
        if self.kdiff_k is not None:
            return Noised(x_t=x_t, t=t, target=k_target(x0, eps, self._alpha(t).to(x0.device), self.kdiff_k))
        return Noised(x_t=x_t, t=t, target=denoising_target(self.train_scheduler, x0, eps, t))

    def error(self, noised: Noised, cond: Cond) -> Tensor:
        """Per-image error against the target; for k-Diff in v-space (‖ŷ − y‖² / D², as it was trained)."""
        if self.kdiff_k is None:
            return super().error(noised, cond)
        pred = self.predict(noised.x_t, noised.t, cond)
        return velocity_error(pred, noised.target, self._alpha(noised.t).to(pred.device), self.kdiff_k)

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        model, x_in, t, cond = self.denoiser_inputs(x_t, t, cond)
        return self._forward(model, x_in, t, cond).to(x_t.dtype)

    # --- DDIM -----------------------------------------------------------------------------------
    def _alpha(self, t: Tensor | int) -> Tensor:
        """ᾱ_t, and below t = 0 the DDIM scheduler's final ᾱ (1 with set_alpha_to_one, else ᾱ_0)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        final = 1.0 if self.scheduler_config.get("set_alpha_to_one", True) else float(self.alphas_cumprod[0])
        return torch.where(t >= 0, self.alphas_cumprod[t.clamp_min(0)], torch.full((), final))

    def split_prediction(self, pred: Tensor, x_t: Tensor, t: Tensor, clip: bool = True) -> tuple[Tensor, Tensor]:
        """(x̂0, ε̂) from the model output, with x̂0 clipped as the scheduler config asks (DDIM Eq. 12) unless
        ``clip`` is False (a loss needs the gradient the clamp would cut)."""
        a = self._alpha(t).to(x_t.device).view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        if self.kdiff_k is not None:
            x0, eps = k_split(pred, x_t, a.flatten().float(), self.kdiff_k)
        elif self.prediction_type == "epsilon":
            eps = pred
            x0 = (x_t - (1 - a).sqrt() * pred) / a.sqrt()
        else:
            x0 = a.sqrt() * x_t - (1 - a).sqrt() * pred
            eps = a.sqrt() * pred + (1 - a).sqrt() * x_t
        if clip and self.scheduler_config.get("clip_sample", False):
            r = float(self.scheduler_config.get("clip_sample_range", 1.0))
            x0 = x0.clamp(-r, r)
        return x0, eps

    def x0_prediction(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x̂0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t for ε, √ᾱ_t x_t − √(1−ᾱ_t) v̂ for v (unclipped, affine in ``pred``)."""
        return self.split_prediction(pred, x_t, t, clip=False)[0]

    def ddim_mean_std(self, pred: Tensor, x_t: Tensor, t: Tensor, t_prev: Tensor, eta: float
                      ) -> tuple[Tensor, Tensor]:
        """Mean and std of p(x_{t_prev} | x_t) for a DDIM step with stochasticity η (DDIM Eqs. 12, 16)."""
        x0, eps = self.split_prediction(pred, x_t, t)
        shape = (-1, *([1] * (x_t.ndim - 1)))
        a_t = self._alpha(t).to(x_t.device).view(shape)
        a_prev = self._alpha(t_prev).to(x_t.device).view(shape)
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * var.clamp_min(0).sqrt()
        mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp_min(0).sqrt() * eps
        return mean.to(x_t.dtype), std.to(x_t.dtype)

    def sampling_scheduler(self, steps: int):
        from diffusers import DDIMScheduler

        config = self.scheduler_config | ({"prediction_type": "v_prediction"} if self.kdiff_k is not None else {})
        sched = DDIMScheduler.from_config(config)
        sched.set_timesteps(steps, device=self.device)
        return sched

    def as_scheduler_output(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The model output as the sampling scheduler reads it: itself, or for k-Diff the velocity it implies
        (v̂ = √ᾱ ε̂ − √(1−ᾱ) x̂0, well conditioned at every t, unlike ε̂ or x̂0 alone)."""
        if self.kdiff_k is None:
            return pred
        a = self._alpha(t).to(x_t.device).float().expand(x_t.shape[0])
        x0, eps = k_split(pred, x_t, a, self.kdiff_k)
        shape = (-1, *([1] * (x_t.ndim - 1)))
        return (a.sqrt().view(shape) * eps - (1 - a).sqrt().view(shape) * x0).to(pred.dtype)

    def _prev_t(self, t: Tensor, steps: int) -> Tensor:
        return t - self.num_train_timesteps // steps

    @torch.no_grad()
    def _sample(self, prompts, steps, guidance, generator, trajectory, eta, latents, image_meta) -> SampleOutput:
        """DDIM sampling with classifier-free guidance; with ``trajectory`` also x_t per step and log-probs."""
        n = len(prompts)
        sched = self.sampling_scheduler(steps)
        if latents is None:
            latents = torch.randn((n, *self.sample_shape), generator=generator).to(self.device)
        x = latents * sched.init_noise_sigma
        cond = self.encode_prompts(list(prompts), image_meta)
        uncond = self.unconditional(n, guidance, image_meta)
        traj, logps = [x], []
        etas = step_etas(eta, len(sched.timesteps))
        stochastic = trajectory and max(etas) > 0  # a density per step; NaN on a deterministic one
        for t, eta_t in zip(sched.timesteps, etas):
            pred = self.guided(x, t, cond, uncond, guidance)
            if stochastic and eta_t > 0:
                mean, std = self.ddim_mean_std(pred, x, t.expand(n), self._prev_t(t, steps).expand(n), eta_t)
                x, logp = gaussian_step(mean, std, generator)
                logps.append(logp)
            else:
                x = sched.step(self.as_scheduler_output(pred, x, t), t, x, eta=eta_t, generator=generator).prev_sample
                if stochastic:
                    logps.append(no_density(x))
            if trajectory:
                traj.append(x)
        return sample_output(self, x, traj, logps, sched.timesteps, trajectory)

    def step_logprob(self, x_t: Tensor, x_prev: Tensor, t: Tensor, cond: Cond, *, steps: int,
                     eta: float = 1.0, uncond: Cond | None = None, guidance: float = 1.0) -> Tensor:
        """Per-image mean-over-elements log p_θ(x_prev | x_t) of a DDIM step with η > 0 (D3PO's log-prob)."""
        if eta <= 0:
            raise ValueError("step_logprob needs eta > 0: a deterministic DDIM step has no density")
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        pred = self.guided(x_t, t, cond, uncond, guidance)
        mean, std = self.ddim_mean_std(pred, x_t, t, self._prev_t(t, steps), eta)
        return gaussian_logprob_mean(x_prev, mean, std)

    @torch.no_grad()
    def invert(self, x0: Tensor, cond: Cond, steps: int = 10, until: Tensor | int | None = None,
               eta: float = 0.0, renoise: int = 0, generator: torch.Generator | None = None,
               path: list | None = None) -> tuple[Tensor, Tensor]:
        """DDIM inversion x0 → x_t up the sampling grid of ``steps`` (the exact reverse of ``sample``'s grid).

        Each step evaluates the active model at the current latent with the target timestep (as in
        null-text inversion) and applies the deterministic DDIM update upwards. ``until`` (an int or
        one value per image) stops each image at the last grid timestep ≤ it (default: the whole
        grid). ``renoise`` > 0 refines each step's ε by that many fixed-point iterations, averaging the
        predictions at the provisional next latent (ReNoise, Garibi et al. 2024). ``eta`` > 0 adds
        InPO's noise η·z·σ after each step. Returns (x_t, t): the latent and grid timestep reached per image.
        ``path``, when given, receives each grid step's latent (one inversion yields every grid point).
        """
        sched = self.sampling_scheduler(steps)
        grid = sched.timesteps.flip(0).tolist()  # ascending
        n = x0.shape[0]
        limit = torch.full((n,), 10**9) if until is None else torch.as_tensor(until).long().cpu().expand(n)
        if bool((limit < grid[0]).any()):
            raise ValueError(f"invert: until={limit.min().item()} is below the first grid timestep {grid[0]}")
        a_prev = float(sched.final_alpha_cumprod)
        x = x0
        reached = torch.zeros(n, dtype=torch.long)
        shape = (-1, *([1] * (x0.ndim - 1)))
        for t in grid:
            active = limit >= t
            if not bool(active.any()):
                break
            t_vec = torch.full((n,), t, device=x.device, dtype=torch.long)
            a_t = float(self.alphas_cumprod[t])
            eps = self._eps(self.predict(x, t_vec, cond), x, a_t)
            x_new = _ddim_up(x, eps, a_prev, a_t)
            for _ in range(renoise):
                eps = 0.5 * (eps + self._eps(self.predict(x_new, t_vec, cond), x_new, a_t))
                x_new = _ddim_up(x, eps, a_prev, a_t)
            if eta > 0:
                var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
                x_new = x_new + eta * max(var, 0.0) ** 0.5 * torch.randn(x.shape, generator=generator).to(x)
            mask = active.to(x.device).view(shape)
            x = torch.where(mask, x_new, x)
            reached = torch.where(active, torch.full_like(reached, t), reached)
            if path is not None:
                path.append(x)
            a_prev = a_t
        return x, reached.to(x0.device)

    def _eps(self, pred: Tensor, x: Tensor, a_t: float) -> Tensor:
        if self.kdiff_k is not None:
            return k_split(pred, x, torch.full((x.shape[0],), float(a_t)), self.kdiff_k)[1]
        return pred if self.prediction_type == "epsilon" else a_t**0.5 * pred + (1 - a_t) ** 0.5 * x

    def inversion_grid(self, steps: int) -> Tensor:
        """The timesteps ``invert`` can stop at, ascending."""
        return self.sampling_scheduler(steps).timesteps.flip(0).cpu()

    def eps_from_xt(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """ε̂ with x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε̂ (InPO's reparametrised noise, Eq. 11)."""
        a = self._alpha(t.cpu()).to(x0.device).view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def _ddim_up(x: Tensor, eps: Tensor, a_prev: float, a_t: float) -> Tensor:
    """One deterministic DDIM step from level ᾱ_prev up to ᾱ_t with a fixed ε."""
    x0_hat = (x - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5
    return a_t**0.5 * x0_hat + (1 - a_t) ** 0.5 * eps
