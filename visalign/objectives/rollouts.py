"""Grouped rollouts for GRPO-family methods: G trajectories per prompt from the current policy, scored and
turned into advantages, then served as batches; and the policy's log-densities over a window of steps.

A round is a pure function of (seed, round index, the model at its start), so a resumed run replays it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rewards.base import score_and_rank
from ..types import PreferenceBatch
from .base import text_conditioning
from .online import draw_prompts
from .policy import PromptStats, group_advantages


class GroupRollouts:
    """The round seam (``make_round`` / ``round_size`` / ``take``) shared by GRPO and DisCO.

    Subclasses set the sampler (``steps``, ``eta``, ``guidance``, ``window``), the group (``group_size``,
    ``prompts_per_round``, ``shared_noise``, ``adv_scale``), ``round_steps`` and ``reward``.
    """

    needs = ("step_logprob", "sample")

    def configure_rollouts(self, group_size: int, prompts_per_round: int, round_steps: int, steps: int, eta: float,
                           window: int, guidance: float | None, shared_noise: bool, reward) -> None:
        """The sampler and group settings both GRPO and DisCO take (their constructors' shared arguments)."""
        from ..rewards.base import LazyReward

        if group_size < 2:
            raise ValueError(f"{type(self).__name__}.group_size={group_size}: a group needs at least 2 rollouts")
        self.group_size, self.prompts_per_round, self.round_steps = group_size, prompts_per_round, round_steps
        self.steps, self.eta, self.window, self.guidance = steps, eta, window, guidance
        self.shared_noise, self.reward = shared_noise, LazyReward(reward)
        self.prompt_stats = PromptStats()  # used with adv_scale='prompt'

    def state_dict(self) -> dict:  # per-prompt reward histories (adv_scale='prompt'), so a resumed run continues them
        return {"prompt_stats": self.prompt_stats.state_dict()} if self.prompt_stats.seen else {}

    def load_state_dict(self, state: dict) -> None:
        self.prompt_stats.load_state_dict(state.get("prompt_stats", {}))

    def make_round(self, backbone, prompts, gen: torch.Generator, round_idx: int = 0) -> dict:
        """P prompts x G rollouts (one shared x_T per group with ``shared_noise``, DanceGRPO), their rewards
        [P, G], advantages, and the sampler's per-step log-densities (the π_old of the ratio)."""
        if self.guidance is None:
            raise ValueError(f"{type(self).__name__}.guidance is unset: the trainer passes train.guidance")
        p, g = self.prompts_per_round, self.group_size
        chosen = draw_prompts(prompts, p, gen)
        rep = [c for c in chosen for _ in range(g)]
        shape = backbone.sample_shape
        x_T = (torch.randn((p, 1, *shape), generator=gen).expand(p, g, *shape) if self.shared_noise
               else torch.randn((p, g, *shape), generator=gen)).reshape(p * g, *shape)
        out = backbone.sample(rep, steps=self.steps, guidance=self.guidance, eta=self.eta, trajectory=True,
                              latents=x_T.to(backbone.device), generator=gen)
        rewards, _ = score_and_rank(out.images, rep, {"r": self.reward}, {"r": 1.0}, group=g, normalise="none")
        adv, keep = round_advantages(rewards, chosen, self.adv_scale, self.prompt_stats)
        traj = torch.stack(out.trajectory, 1).view(p, g, self.steps + 1, *shape)[keep].flatten(0, 1)
        return {"traj": traj.cpu(), "logp": out.log_probs.view(p, g, -1)[keep].flatten(0, 1).cpu(),
                "adv": adv[keep].flatten().cpu(), "timesteps": out.timesteps.cpu(),
                "prompts": [c for c, k in zip(chosen, keep.tolist()) if k for _ in range(g)],
                "log": {"reward_mean": float(rewards.mean()), "zero_var_groups": int((~keep).sum())}
                | self.reward.term_means()}

    def round_size(self, items: dict) -> int:
        return max(1, len(items["prompts"]))

    def take(self, items: dict, idx: Tensor) -> PreferenceBatch | None:
        if not items["prompts"]:
            return None  # every group tied: the loop counts an empty step
        idx = idx % len(items["prompts"])
        n = len(idx)
        return PreferenceBatch(
            prompts=[items["prompts"][i] for i in idx.tolist()], label=torch.ones(n),
            extras={"traj": items["traj"][idx], "logp": items["logp"][idx], "adv": items["adv"][idx],
                    "timesteps": items["timesteps"]})

    def trained_steps(self, logp_old: Tensor) -> Tensor:
        """The first ``window`` steps with a density (the early, high-noise ones, where layout is decided);
        a last deterministic step onto the data has none. ``window`` 0: every such step."""
        usable = torch.nonzero(torch.isfinite(logp_old).all(0)).flatten()
        return usable[: self.window] if self.window else usable

    def policy_and_old(self, backbone, batch: PreferenceBatch) -> tuple[Tensor, Tensor, Tensor]:
        """(log π_θ [B, k] with grad, log π_old [B, k], the k trained step indices) over the batch's window."""
        old = batch.extras["logp"]
        steps = self.trained_steps(old)
        logp = self.window_logprobs(backbone, batch, steps)
        return logp, old[:, steps].to(logp), steps

    def window_logprobs(self, backbone, batch: PreferenceBatch, steps: Tensor, reference: bool = False) -> Tensor:
        """log π_θ(x_{t−1} | x_t, c) [B, len(steps)] of the batch's stored transitions (π_ref with ``reference``)."""
        traj, timesteps = batch.extras["traj"], batch.extras["timesteps"]
        cond = text_conditioning(backbone, batch.prompts)
        uncond = backbone.unconditional(len(batch.prompts), self.guidance)
        out = []
        for s in steps.tolist():
            kw = dict(steps=self.steps, eta=self.eta, uncond=uncond, guidance=self.guidance)
            x_t, x_prev, t = traj[:, s], traj[:, s + 1], timesteps[s].to(traj.device)
            if reference:
                with torch.no_grad(), backbone.reference():
                    out.append(backbone.step_logprob(x_t, x_prev, t, cond, **kw))
            else:
                out.append(backbone.step_logprob(x_t, x_prev, t, cond, **kw))
        return torch.stack(out, 1)


def round_advantages(rewards: Tensor, chosen: list[str], scale: str, stats: PromptStats) -> tuple[Tensor, Tensor]:
    """(Â [P, G], keep [P]) for a round's rewards [P, G] of prompts ``chosen`` [P]: per group ('group'), one
    batch std ('batch', Flow-GRPO's option) or per prompt over rounds ('prompt', DDPO's stat tracking)."""
    if scale != "prompt":
        return group_advantages(rewards, scale)
    p, g = rewards.shape
    adv = stats.advantages([c for c in chosen for _ in range(g)], rewards.flatten()).view(p, g)
    return adv, rewards.std(1, unbiased=False) > 0
