"""Shared step of the inversion methods (InPO, SmPO): per-image latents from inversion, ε̂ by reparametrisation."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..types import PreferenceBatch
from .base import model_inputs


def inverted_errors(backbone, batch: PreferenceBatch, steps: int, eta: float, renoise: int,
                    inversion_model: str, cache: dict | None = None) -> tuple[Tensor, Tensor]:
    """Policy and reference errors [B, K] on inverted latents: one grid t per pair, one ε̂ per image.

    Every image is inverted (no grad) up the ``steps`` grid to its pair's t by the current policy
    (or the reference); ε̂ = (x_t − √ᾱ_t x0)/√(1−ᾱ_t) then replaces the random ε of Diffusion-DPO.
    With the frozen reference, no η noise and a ``cache`` dict, an inversion is computed once per
    (image, t, prompt) and reused: it cannot change during training. x0 is then the latent mean.
    """
    if inversion_model not in ("policy", "reference"):
        raise ValueError(f"inversion_model={inversion_model!r}: expected policy or reference")
    use_cache = cache is not None and inversion_model == "reference" and eta == 0
    if use_cache and batch.latent_std is not None:
        batch.latent_std = None  # deterministic x0 so the cached inversions stay valid
    x0, cond = model_inputs(backbone, batch)
    b, k = x0.shape[:2]
    flat, cond_k = x0.flatten(0, 1), cond.repeat_interleave(k)
    grid = backbone.inversion_grid(steps)
    t = grid[torch.randint(0, len(grid), (b,))].repeat_interleave(k)
    if use_cache:
        x_inv, reached = _cached_inversion(backbone, flat, cond_k, t, steps, renoise, cache,
                                           [p for p in batch.prompts for _ in range(k)])
    else:
        ctx = backbone.reference() if inversion_model == "reference" else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            x_inv, reached = backbone.invert(flat, cond_k, steps=steps, until=t, eta=eta, renoise=renoise)
    eps_hat = backbone.eps_from_xt(flat, x_inv, reached)
    noised = backbone.noise(flat, t=reached, eps=eps_hat)
    err = backbone.error(noised, cond_k).view(b, k)
    with torch.no_grad(), backbone.reference():
        ref = backbone.error(noised, cond_k).view(b, k)
    return err, ref


def _cached_inversion(backbone, flat: Tensor, cond, t: Tensor, steps: int, renoise: int, cache: dict,
                      prompts: list[str]) -> tuple[Tensor, Tensor]:
    """Reference inversions looked up per (image, prompt); a miss inverts the image up the whole grid once
    and stores every grid point, so each image costs one full inversion over the whole run."""
    import hashlib

    grid = backbone.inversion_grid(steps).float()
    level = (grid.view(1, -1) - t.float().cpu().view(-1, 1)).abs().argmin(1)  # grid index of each image's t
    keys = [hashlib.sha1(flat[i].detach().float().cpu().numpy().tobytes()).hexdigest()
            + f"/{steps}/{renoise}/{prompts[i]}" for i in range(len(flat))]
    missing = sorted({key: i for i, key in enumerate(keys) if key not in cache}.values())
    if missing:
        idx = torch.tensor(missing)
        path: list[Tensor] = []
        with torch.no_grad(), backbone.reference():
            backbone.invert(flat[idx], cond[idx.to(flat.device)], steps=steps, renoise=renoise, path=path)
        stacked = torch.stack(path, 1).detach()  # [n_missing, levels, ...]
        for j, i in enumerate(missing):
            cache[keys[i]] = stacked[j]
    x_inv = torch.stack([cache[key][int(lv)] for key, lv in zip(keys, level)])
    return x_inv, grid[level].to(t)
