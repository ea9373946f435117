"""What every method shares: turning a batch into model-space x0 and conditioning, and the logged metrics."""

from __future__ import annotations

import torch
from torch import Tensor

from ..types import PreferenceBatch, as_float


class Method:
    """A preference objective: ``method(backbone, batch) -> StepOutput``.

    ``data`` names the batch shape it needs (pairs | lists | prompts) and so the source the loop reads
    batches from (``DATA_SOURCES``); ``needs`` lists optional Backbone capabilities (``invert``,
    ``step_logprob``) checked before any weights load; ``uses_reference`` says whether full fine-tuning
    keeps a frozen copy of the denoiser.
    """

    data: str = "pairs"
    needs: tuple[str, ...] = ()
    uses_reference: bool = True

    def state_dict(self) -> dict:
        """JSON-able state kept across steps (β-DPO's moving averages); checkpoints store it."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def param_groups(self, backbone) -> list[dict]:
        """Trainable modules the method adds to the backbone itself (OFS-DPO's slow LoRA), as optimizer groups
        ``{"params": [...], "lr_scale": s}`` (learning rate s·train.lr); called once, after the run's LoRA."""
        return []


class OnlineMethod(Method):
    """A method that samples its own training data from the model being trained, in rounds.

    Every ``round_steps`` optimizer steps the round source calls ``make_round`` (under no_grad, the model in
    eval mode) on the run's prompts; micro-batches are then ``take(items, idx)`` of the round's
    ``round_size(items)`` items. With ``reset_reference`` the reference is a frozen copy of the policy at each
    round start (D3PO's paper, DDO's self-play, iterative DPO).
    """

    data = "prompts"
    round_steps: int = 1
    reset_reference: bool = False

    def make_round(self, backbone, prompts: list[str], gen: torch.Generator, round_idx: int = 0) -> dict:
        """Sample and score one round's data with the current model; its ``log`` entry ({name: float}, e.g.
        the round's mean reward) is logged with every step trained on the round."""
        raise NotImplementedError

    def round_size(self, items: dict) -> int:
        """How many items ``take`` may index in this round."""
        raise NotImplementedError

    def take(self, items: dict, idx: Tensor) -> PreferenceBatch | None:
        """The micro-batch of the round's items ``idx`` (None when nothing in them is usable)."""
        raise NotImplementedError


def model_inputs(backbone, batch: PreferenceBatch, generator: torch.Generator | None = None):
    """(x0 [B, K, ...] in model space, cond for the B prompts), from the cache when present."""
    if batch.latent_mean is not None:
        mean, std = batch.latent_mean, batch.latent_std
        x0 = mean if std is None else mean + std * torch.randn(mean.shape, generator=generator).to(mean)
    else:
        b, k = batch.images.shape[:2]
        with torch.no_grad():
            x0 = backbone.encode_images(batch.images.flatten(0, 1), generator=generator)
        x0 = x0.view(b, k, *x0.shape[1:])
    cond = batch.cond
    if cond is None or getattr(backbone, "text_lora", False):  # a trained text encoder: cached text is stale
        cond = text_conditioning(backbone, batch.prompts, batch.image_meta or None)
    return x0.contiguous(), cond


def text_conditioning(backbone, prompts, image_meta: dict | None = None):
    """The conditioning a loss uses (``encode_for_training``: with grad and the reference's own when the text
    encoder trains); a backbone written before that seam is encoded without grad."""
    if hasattr(backbone, "encode_for_training"):
        return backbone.encode_for_training(prompts, image_meta)
    with torch.no_grad():
        return backbone.encode_prompts(prompts, image_meta)


def shared_noise(backbone, x0: Tensor) -> tuple[Tensor, Tensor]:
    """One t and one ε per list, shared by its K images (Diffusion-DPO, RankDPO, MaPO): ([B·K], [B·K, ...])."""
    b, k = x0.shape[:2]
    t = backbone.sample_timesteps(b).repeat_interleave(k)
    # randn over an explicit shape: randn_like would follow x0's strides and break determinism across layouts
    eps = torch.randn(x0[:, 0].shape, dtype=x0.dtype, device=x0.device).repeat_interleave(k, 0)
    return t, eps


def noised_lists(backbone, x0: Tensor, cond):
    """x0 [B, K, ...] flattened and noised at one shared (t, ε) per list, and the conditioning repeated K times."""
    t, eps = shared_noise(backbone, x0)
    return backbone.noise(x0.flatten(0, 1), t=t, eps=eps), cond.repeat_interleave(x0.shape[1])


def denoising_errors(backbone, x0: Tensor, cond, reference: bool = True) -> tuple[Tensor, Tensor | None]:
    """Per-image policy and reference errors [B, K] at a shared (t, ε) per list."""
    b, k = x0.shape[:2]
    noised, cond_k = noised_lists(backbone, x0, cond)
    err = backbone.error(noised, cond_k).view(b, k)
    ref = None
    if reference:
        with torch.no_grad(), backbone.reference():
            ref = backbone.error(noised, cond_k).view(b, k)
    return err, ref


def weighted_mean(losses: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum().clamp_min(1e-12)


def pair_metrics(h: Tensor, err: Tensor, ref: Tensor | None) -> dict[str, float]:
    """What users need to read a flat DPO loss: implicit accuracy, mean logit, per-side errors."""
    out = {"implicit_acc": as_float((h > 0).float()), "logit_mean": as_float(h),
           "err_w": as_float(err[:, 0]), "err_l": as_float(err[:, 1])}
    if ref is not None:
        out |= {"ref_err_w": as_float(ref[:, 0]), "ref_err_l": as_float(ref[:, 1])}
    return out
