"""DiffusionNFT (Zheng et al. 2025, "Online Diffusion Reinforcement with Forward Process", arXiv 2509.16117):
online RL on the forward (noising) process. No likelihoods, no SDE sampler, no CFG in the loss: a round's clean
images, drawn by the "old" policy, train an implicit positive and an implicit negative policy with the ordinary
denoising loss, weighted by each image's reward."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UserError
from ..registry import METHODS
from ..types import PreferenceBatch, StepOutput, as_float
from .base import OnlineMethod, model_inputs
from .online import draw_prompts
from .policy import PromptStats
from .rollouts import round_advantages

OLD = "old"  # the sampling policy's LoRA adapter: an EMA of the trained one ('default'), never trained itself


def nft_optimality(adv: Tensor, clip: float) -> Tensor:
    """r = clamp(clip(Â, −c, c) / 2c + 1/2, 0, 1): the advantage as an optimality probability; r = 1/2 is neutral."""
    return (adv.clamp(-clip, clip) / clip / 2 + 0.5).clamp(0.0, 1.0)


def adaptive_mse(x0_hat: Tensor, x0: Tensor, floor: float = 1e-5) -> Tensor:
    """Per-image ‖x̂0 − x0‖² / w with w = sg(mean |x̂0 − x0|) ≥ ``floor`` (the authors' adaptive weight): [B]."""
    err = (x0_hat.float() - x0.float()).flatten(1)
    w = err.detach().abs().mean(1).clamp_min(floor)
    return err.pow(2).mean(1) / w


def nft_loss(x0_theta: Tensor, x0_old: Tensor, x0: Tensor, r: Tensor, beta: float) -> Tensor:
    """DiffusionNFT's per-image policy loss [B] (paper Eq. 8, in x0 space as Flow-Factory codes it):

        v⁺ = β·v_θ + (1 − β)·v_old,      v⁻ = (1 + β)·v_old − β·v_θ   (the implicit negative policy)
        L  = [ r·‖x̂0(v⁺) − x0‖²/w⁺ + (1 − r)·‖x̂0(v⁻) − x0‖²/w⁻ ] / β

    x̂0(·) is affine in the prediction for ε, v and flow parameterisations alike (x̂0 = a·x_t + b·pred), so the
    mixtures are taken directly between x̂0_θ and x̂0_old (the stop-gradient old policy's). With r = 1/2 and
    v_θ = v_old the two terms' gradients cancel: a neutral image does not move the policy.
    """
    pos = beta * x0_theta + (1 - beta) * x0_old
    neg = (1 + beta) * x0_old - beta * x0_theta
    r = r.to(pos.dtype)
    return (r * adaptive_mse(pos, x0) + (1 - r) * adaptive_mse(neg, x0)) / beta


@METHODS.register("nft")
class DiffusionNFT(OnlineMethod):
    """DiffusionNFT on the online-round seam.

    Round: P prompts x G images from the old policy (any sampler: DDIM with ``eta``, at ``guidance``), scored by
    ``reward`` (one, or a weighted sum); per-group advantages ('group' | 'batch' | 'prompt', as GRPO) clipped
    at ``adv_clip`` and mapped to r in [0, 1]; flat groups dropped. Step: each image noised afresh on the
    forward process (the backbone's training t and ε), the policy's and the old policy's x0 predictions,
    ``nft_loss`` times ``adv_clip`` (the authors' scale), plus ``kl_coef`` x mean ‖v_θ − v_ref‖² (the
    reference: adapters off). Old policy: a second LoRA; at each round start
    v_old ← d·v_old + (1 − d)·v_θ with d = ``old_ema`` (0: the policy at the round start); the update is
    recorded in the method's state, so a resumed round replays exactly (the old policy is its sampler).
    """

    needs = ("sample", "x0_prediction")

    def __init__(self, beta: float = 1.0, group_size: int = 8, prompts_per_round: int = 8, round_steps: int = 4,
                 steps: int = 20, eta: float = 0.0, guidance: float | None = None, adv_clip: float = 5.0,
                 adv_scale: str = "group", kl_coef: float = 0.0, old_ema: float = 0.5,
                 reward: str | dict | list = "constraints"):
        from ..rewards.base import LazyReward

        if not beta > 0 or not adv_clip > 0 or group_size < 2 or not 0 <= old_ema < 1 or kl_coef < 0:
            raise ValueError(f"nft: beta={beta} and adv_clip={adv_clip} must be > 0, group_size={group_size} >= 2, "
                             f"old_ema={old_ema} in [0, 1), kl_coef={kl_coef} >= 0")
        if adv_scale not in ("group", "batch", "prompt"):
            raise ValueError(f"nft.adv_scale={adv_scale!r}: expected group, batch or prompt")
        self.beta, self.group_size, self.prompts_per_round, self.round_steps = beta, group_size, prompts_per_round, \
            round_steps
        self.steps, self.eta, self.guidance, self.adv_clip, self.adv_scale = steps, eta, guidance, adv_clip, adv_scale
        self.kl_coef, self.old_ema, self.reward = kl_coef, old_ema, LazyReward(reward)
        self.prompt_stats, self.old_round = PromptStats(), -1

    def param_groups(self, backbone) -> list[dict]:
        """The old policy's LoRA beside the trained one (a frozen twin: it adds no optimizer group)."""
        if not getattr(backbone, "uses_lora", False):
            raise UserError("objective.name=nft needs lora.enabled=true: its old (sampling) policy is a second LoRA")
        for p in backbone.add_twin_adapter(OLD):
            p.requires_grad_(False)
        return []

    def update_old(self, backbone, round_idx: int) -> None:
        """v_old ← d·v_old + (1 − d)·v_θ, once per round (a replayed round after a resume does not apply it twice)."""
        if round_idx <= self.old_round:
            return
        params = dict(backbone.unwrapped().named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                if f".{OLD}." in name:
                    p.mul_(self.old_ema).add_(params[name.replace(f".{OLD}.", ".default.")].detach(),
                                              alpha=1 - self.old_ema)
        self.old_round = round_idx

    def make_round(self, backbone, prompts, gen: torch.Generator, round_idx: int = 0) -> dict:
        if self.guidance is None:
            raise ValueError("nft.guidance is unset: the trainer passes train.guidance")
        self.update_old(backbone, round_idx)
        p, g = self.prompts_per_round, self.group_size
        chosen = draw_prompts(prompts, p, gen)
        rep = [c for c in chosen for _ in range(g)]
        noise = torch.randn((p * g, *backbone.sample_shape), generator=gen)
        with backbone.adapter(OLD):
            images = backbone.sample(rep, steps=self.steps, guidance=self.guidance, eta=self.eta, latents=noise,
                                     generator=gen).images.cpu()
        rewards = self.reward(images, rep).view(p, g)
        adv, keep = round_advantages(rewards, chosen, self.adv_scale, self.prompt_stats)
        r = nft_optimality(adv, self.adv_clip)
        images = images.view(p, g, *images.shape[1:])
        return {"images": images[keep].flatten(0, 1), "r": r[keep].flatten(),
                "prompts": [c for c, k in zip(chosen, keep.tolist()) if k for _ in range(g)],
                "log": {"reward_mean": float(rewards.mean()), "zero_var_groups": int((~keep).sum())}
                | self.reward.term_means()}

    def round_size(self, items: dict) -> int:
        return max(1, len(items["prompts"]))

    def take(self, items: dict, idx: Tensor) -> PreferenceBatch | None:
        if not items["prompts"]:
            return None  # every group flat: the loop counts an empty step
        idx = idx % len(items["prompts"])
        return PreferenceBatch(prompts=[items["prompts"][i] for i in idx.tolist()], label=torch.ones(len(idx)),
                               images=items["images"][idx].unsqueeze(1), extras={"r": items["r"][idx]})

    def __call__(self, backbone, batch: PreferenceBatch) -> StepOutput:
        x0, cond = model_inputs(backbone, batch)
        x0 = x0[:, 0]
        noised = backbone.noise(x0)
        pred = backbone.predict(noised.x_t, noised.t, cond)
        with torch.no_grad(), backbone.adapter(OLD):
            pred_old = backbone.predict(noised.x_t, noised.t, cond)
        x0_theta = backbone.x0_prediction(pred, noised.x_t, noised.t)
        x0_old = backbone.x0_prediction(pred_old, noised.x_t, noised.t)
        r = batch.extras["r"].to(x0.device)
        loss = self.adv_clip * nft_loss(x0_theta, x0_old, x0, r, self.beta).mean()
        metrics = {"r_mean": as_float(r), "old_gap": as_float((pred - pred_old).detach().pow(2).flatten(1).mean(1))}
        if self.kl_coef > 0:
            with torch.no_grad(), backbone.reference():
                pred_ref = backbone.predict(noised.x_t, noised.t, cond)
            kl = (pred.float() - pred_ref.float()).pow(2).flatten(1).mean(1).mean()
            loss = loss + self.kl_coef * kl
            metrics["kl"] = as_float(kl)
        return StepOutput(loss, metrics)

    def state_dict(self) -> dict:
        return {"old_round": self.old_round, "prompt_stats": self.prompt_stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.old_round = int(state.get("old_round", -1))
        self.prompt_stats.load_state_dict(state.get("prompt_stats", {}))
