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

    Subclasses set the sampler (``steps``, ``eta``, ``guidance``, ``window``, ``noise``, ``window_slide``), the
    group (``group_size``, ``prompts_per_round``, ``shared_noise``, ``adv_scale``), ``round_steps`` and ``reward``.

    The window: ``window`` steps trained per rollout (0: every step with a density), starting at step 0, or with
    ``window_slide`` = k one step later every k rounds, wrapping round (MixGRPO's sliding window). ``noise``
    'all' samples with η at every step (DDPO, Flow-GRPO); 'window' with η inside the window only and the ODE
    (η = 0) outside it (MixGRPO, Flow-GRPO-Fast): the steps outside carry no density and are not stored. A round
    keeps only the window's states, log-densities and timesteps either way.
    """

    needs = ("step_logprob", "sample")

    def configure_rollouts(self, group_size: int, prompts_per_round: int, round_steps: int, steps: int, eta: float,
                           window: int, guidance: float | None, shared_noise: bool, reward, noise: str = "all",
                           window_slide: int = 0) -> None:
        """The sampler and group settings both GRPO and DisCO take (their constructors' shared arguments)."""
        from ..rewards.base import LazyReward

        name = type(self).__name__.lower()
        if group_size < 2:
            raise ValueError(f"{name}.group_size={group_size}: a group needs at least 2 rollouts")
        if noise not in ("all", "window"):
            raise ValueError(f"{name}.noise={noise!r}: expected all (η at every step) or window (η in the window)")
        if not 0 <= window < steps:
            raise ValueError(f"{name}.window={window}: expected 0 (every step) up to steps - 1 = {steps - 1}")
        if window_slide < 0 or (window_slide and not window):
            raise ValueError(f"{name}.window_slide={window_slide}: expected rounds per one-step shift (>= 0), "
                             "with a window (window > 0) to slide")
        self.group_size, self.prompts_per_round, self.round_steps = group_size, prompts_per_round, round_steps
        self.steps, self.eta, self.window, self.guidance = steps, eta, window, guidance
        self.noise, self.window_slide = noise, window_slide
        self.shared_noise, self.reward = shared_noise, LazyReward(reward)
        self.prompt_stats = PromptStats()  # used with adv_scale='prompt'

    def window_steps(self, round_idx: int) -> range:
        """The sampler steps round ``round_idx`` trains: ``window`` of them from its start, which slides one step
        every ``window_slide`` rounds over all steps but the last one (onto the data: often without a density).
        ``window`` 0: every step (``trained_steps`` then skips those without a density)."""
        if not self.window:
            return range(self.steps)
        starts = self.steps - self.window  # window starts 0 .. steps-1-window keep the last step out
        start = (round_idx // self.window_slide) % starts if self.window_slide else 0
        return range(start, start + self.window)

    def sampler_eta(self, window: range) -> float | list[float]:
        """η for the sampler: one for every step ('all'), or η in ``window`` and the ODE elsewhere ('window')."""
        if self.noise == "all":
            return self.eta
        return [self.eta if i in window else 0.0 for i in range(self.steps)]

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
        window = self.window_steps(round_idx)
        out = backbone.sample(rep, steps=self.steps, guidance=self.guidance, eta=self.sampler_eta(window),
                              trajectory=True, latents=x_T.to(backbone.device), generator=gen)
        rewards, _ = score_and_rank(out.images, rep, {"r": self.reward}, {"r": 1.0}, group=g, normalise="none")
        adv, keep = round_advantages(rewards, chosen, self.adv_scale, self.prompt_stats)
        # only the window's transitions are kept: states window.start .. window.stop, their densities and t
        states = torch.stack(out.trajectory[window.start: window.stop + 1], 1)
        traj = states.view(p, g, len(window) + 1, *shape)[keep].flatten(0, 1)
        logp = out.log_probs[:, window.start: window.stop].reshape(p, g, -1)[keep].flatten(0, 1)
        return {"traj": traj.cpu(), "logp": logp.cpu(), "adv": adv[keep].flatten().cpu(),
                "timesteps": out.timesteps[window.start: window.stop].cpu(),
                "prompts": [c for c, k in zip(chosen, keep.tolist()) if k for _ in range(g)],
                "log": {"reward_mean": float(rewards.mean()), "zero_var_groups": int((~keep).sum()),
                        "window_start": float(window.start)} | self.reward.term_means()}

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
        """The stored steps with a density (a round stores its window only: ``window_steps``); a last
        deterministic step onto the data has none."""
        return torch.nonzero(torch.isfinite(logp_old).all(0)).flatten()

    def policy_and_old(self, backbone, batch: PreferenceBatch) -> tuple[Tensor, Tensor, Tensor]:
        """(log π_θ [B, k] with grad, log π_old [B, k], the k trained step indices) over the batch's window."""
        old = batch.extras["logp"]
        steps = self.trained_steps(old)
        logp = self.window_logprobs(backbone, batch, steps)
        return logp, old[:, steps].to(logp), steps

    def window_logprobs(self, backbone, batch: PreferenceBatch, steps: Tensor, reference: bool = False) -> Tensor:
        """log π_θ(x_{t−1} | x_t, c) [B, len(steps)] of the batch's stored transitions (π_ref with ``reference``)."""
        traj, timesteps = batch.extras["traj"], batch.extras["timesteps"]
        # the rollouts' precision (train.rollout_precision), the text encoders' included: π_θ is computed as the
        # sampler computed π_old, so ρ = 1 before an update
        with backbone.rollout_autocast():
            cond = text_conditioning(backbone, batch.prompts)
            uncond = backbone.unconditional(len(batch.prompts), self.guidance)
        out = []
        for s in steps.tolist():
            kw = dict(steps=self.steps, eta=self.eta, uncond=uncond, guidance=self.guidance)
            x_t, x_prev, t = traj[:, s], traj[:, s + 1], timesteps[s].to(traj.device)
            with backbone.rollout_autocast():
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
