"""DDO (Zheng et al., ICML 2025): the likelihood ratio to a reference as a GAN discriminator, real vs fake."""

from __future__ import annotations

import torch

from ..registry import METHODS, REAL_FOR_PROMPTS, ConfigError
from ..types import PreferenceBatch, StepOutput, as_float
from .base import OnlineMethod
from .implicit import implicit_reward
from .losses import ddo_loss
from .online import draw_prompts


@METHODS.register("ddo")
class DDO(OnlineMethod):
    """DDO: −log σ(r(real)) − α log σ(−r(fake)), r the implicit reward vs the reference; self-play rounds.

    ``real`` names where each prompt's real image comes from (``REAL_FOR_PROMPTS``): ``shapes`` (ShapesWorld's
    exact renders) or ``images:PATH`` (a captioned dataset or image folder; data.path = the same, so the
    prompts are its captions). Fakes are the reference's samples (the policy at each round start).
    """

    needs = ("sample",)

    def __init__(self, beta: float = 5000.0, alpha: float = 1.0, prompts_per_round: int = 64, round_steps: int = 50,
                 steps: int = 20, guidance: float = 1.0, real: str = "shapes", reset_reference: bool = True):
        scheme = real.partition(":")[0]
        if scheme not in REAL_FOR_PROMPTS:
            raise ConfigError(f"objective.real={real!r}: expected a prompt-matched real image source, one of "
                              f"{', '.join(s + ':...' for s in REAL_FOR_PROMPTS.names())} (images:PATH is a "
                              "captioned dataset or image folder; train on its captions)")
        self.real = real
        self.beta, self.alpha, self.steps, self.guidance = beta, alpha, steps, guidance
        self.prompts_per_round, self.round_steps, self.reset_reference = prompts_per_round, round_steps, reset_reference

    def make_round(self, backbone, prompts, gen, round_idx: int = 0) -> dict:
        """Fakes from the reference model (= the policy at the round start when reset), reals rendered."""
        chosen = draw_prompts(prompts, self.prompts_per_round, gen)
        noise = torch.randn((len(chosen), *backbone.sample_shape), generator=gen).to(backbone.device)
        with backbone.reference():
            fake = backbone.sample(chosen, steps=self.steps, guidance=self.guidance, latents=noise).images.cpu()
        scheme, _, spec = self.real.partition(":")
        real = REAL_FOR_PROMPTS.get(scheme)(spec, chosen, gen, fake.shape[-1], "objective.real")
        return {"prompts": chosen, "images": torch.stack([real, fake], 1)}

    def round_size(self, items: dict) -> int:
        return len(items["prompts"])

    def take(self, items: dict, idx: torch.Tensor) -> PreferenceBatch:
        return PreferenceBatch(prompts=[items["prompts"][i] for i in idx.tolist()], label=torch.ones(len(idx)),
                               images=items["images"][idx])

    def __call__(self, backbone, batch: PreferenceBatch) -> StepOutput:
        from .base import model_inputs

        x0, cond = model_inputs(backbone, batch)  # [B, 2] = (real, fake)
        b = x0.shape[0]
        flat, cond2 = x0.flatten(0, 1), cond.repeat_interleave(2)
        noised = backbone.noise(flat)  # independent t and ε per image: real and fake are not paired
        err = backbone.error(noised, cond2).view(b, 2)
        with torch.no_grad(), backbone.reference():
            ref = backbone.error(noised, cond2).view(b, 2)
        r = implicit_reward(err, ref, self.beta)
        real_loss, fake_loss = ddo_loss(r[:, 0], r[:, 1], self.alpha)
        return StepOutput((real_loss + fake_loss).mean(), {
            "r_real": as_float(r[:, 0]), "r_fake": as_float(r[:, 1]),
            "implicit_acc": as_float((r[:, 0] > r[:, 1]).float()), "err_real": as_float(err[:, 0]),
            "err_fake": as_float(err[:, 1])})
