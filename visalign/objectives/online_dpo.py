"""Iterative on-policy Diffusion-DPO (DNO-style batched rounds): sample K images per prompt from the current
policy, rank them by the reward, train any pairwise head on best-vs-worst (or every margin) pair, and reset
the reference to the policy at each round start; option: OFS-DPO's fast and slow LoRA modules (``fast_slow``)."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..registry import METHODS
from ..rewards.base import score_and_rank
from ..types import PreferenceBatch, StepOutput, as_float
from .base import OnlineMethod, model_inputs, noised_lists, pair_metrics
from .diffusion_dpo import DiffusionDPO
from .fast_slow import Roles, chasing_losses
from .implicit import implicit_reward
from .online import draw_prompts

SLOW = "slow"  # the slow module's adapter name; the policy (sampled, saved) is the fast one, 'default'


@METHODS.register("online_dpo")
class OnlineDPO(OnlineMethod):
    """Iterative on-policy DPO: rounds of K samples per prompt, reward-ranked pairs, reference reset per round.

    ``pairs``: 'best-worst' (one pair per prompt) or 'all' (every pair at least ``min_margin`` apart).
    The loss is Diffusion-DPO's with any pairwise head; ``reset_reference`` makes round r's reference the
    policy at its start (DNO, iterative DPO), so each round is a small step from the last.

    ``fast_slow`` (LoRA runs): OFS-DPO's two identical LoRA modules, the policy's (fast, train.lr) and a slow
    one (``slow_lr`` x train.lr), each with its DPO loss plus the chasing regulariser of weight ``ofs_alpha``,
    leadership re-dealt every ``chase_every`` micro-batches (``fast_slow.py``). The fast module is sampled
    and saved.
    """

    needs = ("sample",)

    def __init__(self, beta: float = 5000.0, head: str | dict = "sigmoid", samples_per_prompt: int = 4,
                 prompts_per_round: int = 32, round_steps: int = 8, steps: int = 20, guidance: float | None = None,
                 pairs: str = "best-worst", min_margin: float = 0.1, reset_reference: bool = True,
                 reward: str | dict | list = "constraints", fast_slow: bool = False, ofs_alpha: float = 0.1,
                 slow_lr: float = 0.5, chase_every: int = 8):
        from ..rewards.base import LazyReward

        if pairs not in ("best-worst", "all"):
            raise ValueError(f"online_dpo.pairs={pairs!r}: expected best-worst or all")
        self.dpo = DiffusionDPO(beta, head)
        self.k, self.prompts_per_round, self.round_steps = samples_per_prompt, prompts_per_round, round_steps
        self.steps, self.guidance, self.pairs, self.min_margin = steps, guidance, pairs, min_margin
        self.reset_reference = reset_reference
        self.reward = LazyReward(reward)
        if fast_slow and (chase_every < 1 or slow_lr <= 0):
            raise ValueError(f"online_dpo: chase_every={chase_every} and slow_lr={slow_lr} must be positive")
        self.fast_slow, self.ofs_alpha, self.slow_lr = fast_slow, ofs_alpha, slow_lr
        self.roles = Roles(chase_every)

    def param_groups(self, backbone) -> list[dict]:
        if not self.fast_slow:
            return []
        if not getattr(backbone, "uses_lora", False):
            raise UserError("objective.fast_slow=true needs lora.enabled=true: its fast and slow modules are LoRAs")
        return [{"params": backbone.add_twin_adapter(SLOW), "lr_scale": self.slow_lr}]

    def make_round(self, backbone, prompts, gen: torch.Generator, round_idx: int = 0) -> dict:
        """K samples per prompt with the current policy (the evaluation's sampler), ranked; pairs kept by margin."""
        if self.guidance is None:
            raise ValueError("online_dpo.guidance is unset: the trainer passes train.guidance")
        chosen = draw_prompts(prompts, self.prompts_per_round, gen)
        rep = [c for c in chosen for _ in range(self.k)]
        noise = torch.randn((len(rep), *backbone.sample_shape), generator=gen)
        images = backbone.sample(rep, steps=self.steps, guidance=self.guidance, latents=noise).images.cpu()
        scores, _ = score_and_rank(images, rep, {"r": self.reward}, {"r": 1.0}, group=self.k, normalise="none")
        images = images.view(len(chosen), self.k, *images.shape[1:])
        winners, losers, captions = [], [], []
        for p, s in enumerate(scores):
            order = s.argsort(descending=True).tolist()
            cand = [(order[0], order[-1])] if self.pairs == "best-worst" else [
                (i, j) for i in order for j in order if s[i] - s[j] > 0]
            for i, j in cand:
                if float(s[i] - s[j]) >= self.min_margin and float(s[i] - s[j]) > 0:
                    winners.append(images[p, i])
                    losers.append(images[p, j])
                    captions.append(chosen[p])
        pairs = torch.stack([torch.stack(winners), torch.stack(losers)], 1) if captions else None
        return {"images": pairs, "prompts": captions,
                "log": {"reward_mean": float(scores.mean())} | self.reward.term_means()}

    def round_size(self, items: dict) -> int:
        return max(1, len(items["prompts"]))

    def take(self, items: dict, idx: torch.Tensor) -> PreferenceBatch | None:
        if not items["prompts"]:
            return None
        idx = idx % len(items["prompts"])
        return PreferenceBatch(prompts=[items["prompts"][i] for i in idx.tolist()], label=torch.ones(len(idx)),
                               images=items["images"][idx])

    def __call__(self, backbone, batch: PreferenceBatch) -> StepOutput:
        return self.fast_slow_step(backbone, batch) if self.fast_slow else self.dpo(backbone, batch)

    def fast_slow_step(self, backbone, batch: PreferenceBatch) -> StepOutput:
        """Both modules' DPO losses and the chasing terms at one shared (t, ε) per pair."""
        x0, cond = model_inputs(backbone, batch)
        noised, cond_k = noised_lists(backbone, x0, cond)
        b, k = x0.shape[:2]
        err = backbone.error(noised, cond_k).view(b, k)
        with backbone.adapter(SLOW):
            err_slow = backbone.error(noised, cond_k).view(b, k)
        with torch.no_grad(), backbone.reference():
            ref = backbone.error(noised, cond_k).view(b, k)
        label, head, beta = batch.label.to(err), self.dpo.head, self.dpo.beta
        r, r_slow = implicit_reward(err, ref, beta), implicit_reward(err_slow, ref, beta)
        dpo_fast = head.pair_loss(r[:, 0], r[:, 1], label, batch.scores)
        dpo_slow = head.pair_loss(r_slow[:, 0], r_slow[:, 1], label, batch.scores)
        chase_fast, chase_slow = chasing_losses(r[:, 0] - r[:, 1], r_slow[:, 0] - r_slow[:, 1],
                                                self.roles.fast_leads, self.ofs_alpha)
        loss = (dpo_fast + chase_fast + dpo_slow + chase_slow).mean()
        metrics = pair_metrics(r[:, 0] - r[:, 1], err, ref) | {
            "dpo_fast": as_float(dpo_fast), "dpo_slow": as_float(dpo_slow), "fast_leads": float(self.roles.fast_leads),
            "implicit_acc_slow": as_float((r_slow[:, 0] > r_slow[:, 1]).float())}
        self.roles.observe(as_float(dpo_fast), as_float(dpo_slow))
        return StepOutput(loss, metrics)

    def state_dict(self) -> dict:  # a stateful head's (β-DPO's), and who leads
        return {"dpo": self.dpo.state_dict()} | ({"roles": self.roles.state_dict()} if self.fast_slow else {})

    def load_state_dict(self, state: dict) -> None:
        self.dpo.load_state_dict(state.get("dpo", {}))
        self.roles.load_state_dict(state.get("roles", {}))
