"""D3PO (Yang et al., CVPR 2024): per-denoising-step DPO on sampled trajectory pairs sharing x_T."""

from __future__ import annotations

import torch

from ..registry import METHODS
from ..rewards.base import score_and_rank
from ..types import PreferenceBatch, StepOutput, as_float
from .base import OnlineMethod, text_conditioning
from .losses import d3po_loss
from .online import draw_prompts


@METHODS.register("d3po")
class D3PO(OnlineMethod):
    """D3PO: clipped per-step log-ratio DPO on trajectory pairs ranked by a reward (authors: β 0.1, ε 0.1, η 1).

    ``guidance=None`` samples at the run's ``train.guidance`` (filled in by the trainer): the trajectories
    must come from the policy as it will be sampled, or the per-step preference is learned off-policy.
    Pairs need a reward gap of at least ``min_margin`` (the default reward, ``constraints``, has no
    cleanliness term to decide ties); rounds are fresh (32 pairs, 4 steps of 8: each pair about once).
    """

    needs = ("step_logprob", "sample")

    def __init__(self, beta: float = 0.1, clip_eps: float = 0.1, steps: int = 10, eta: float = 1.0,
                 guidance: float | None = None, prompts_per_round: int = 32, round_steps: int = 4,
                 timestep_fraction: float = 1.0, reward: str | dict | list = "constraints", min_margin: float = 0.0,
                 reset_reference: bool = False):
        from ..rewards.base import LazyReward

        self.beta, self.clip_eps, self.steps, self.eta, self.guidance = beta, clip_eps, steps, eta, guidance
        self.prompts_per_round, self.round_steps = prompts_per_round, round_steps
        self.timestep_fraction, self.reset_reference, self.min_margin = timestep_fraction, reset_reference, min_margin
        self.reward = LazyReward(reward)

    def make_round(self, backbone, prompts, gen, round_idx: int = 0) -> dict:
        """2 trajectories per prompt from one shared x_T; winner = higher reward; ties dropped."""
        if self.guidance is None:
            raise ValueError("D3PO.guidance is unset: pass guidance=<the classifier-free guidance the model is "
                             "sampled at> (the trainer passes train.guidance)")
        chosen = draw_prompts(prompts, self.prompts_per_round, gen)
        x_T = torch.randn((len(chosen), *backbone.sample_shape), generator=gen).repeat_interleave(2, 0)
        doubled = [p for p in chosen for _ in range(2)]
        out = backbone.sample(doubled, steps=self.steps, guidance=self.guidance, eta=self.eta, trajectory=True,
                              latents=x_T.to(backbone.device), generator=gen)
        scores, _ = score_and_rank(out.images, doubled, {"r": self.reward}, {"r": 1.0}, group=2, normalise="none")
        gap = (scores[:, 0] - scores[:, 1]).abs()
        keep = (gap > 0) & (gap >= self.min_margin)  # a pair is a preference only with a margin
        order = torch.where(scores[:, 0] >= scores[:, 1], 0, 1)  # index of the winner within each pair
        traj = torch.stack(out.trajectory, 1).view(len(chosen), 2, self.steps + 1, *backbone.sample_shape)
        logp = out.log_probs.view(len(chosen), 2, self.steps)
        w, l_ = order, 1 - order
        ar = torch.arange(len(chosen))
        traj = torch.stack([traj[ar, w], traj[ar, l_]], 1)[keep]
        logp = torch.stack([logp[ar, w], logp[ar, l_]], 1)[keep]
        # at the first round, or after a reference reset, the sampler IS the reference: its log-probs are reusable
        ref_is_sampler = round_idx == 0 or self.reset_reference
        return {"traj": traj.cpu(), "logp": logp.cpu(), "timesteps": out.timesteps.cpu(),
                "prompts": [c for c, k in zip(chosen, keep.tolist()) if k], "reuse_ref": ref_is_sampler,
                "log": {"reward_mean": float(scores.mean())}  # every rollout: the training-prompt reward curve
                | self.reward.term_means()}

    def round_size(self, items: dict) -> int:
        return max(1, len(items["prompts"]))

    def take(self, items: dict, idx: torch.Tensor) -> PreferenceBatch:
        if not items["prompts"]:
            return None
        idx = idx % len(items["prompts"])
        return PreferenceBatch(prompts=[items["prompts"][i] for i in idx.tolist()], label=torch.ones(len(idx)),
                               extras={"traj": items["traj"][idx], "logp": items["logp"][idx],
                                       "timesteps": items["timesteps"], "reuse_ref": torch.tensor(items["reuse_ref"])})

    def __call__(self, backbone, batch: PreferenceBatch) -> StepOutput:
        traj, timesteps = batch.extras["traj"], batch.extras["timesteps"]
        b = traj.shape[0]
        # a final DDIM step onto ᾱ = 1 is deterministic (σ = 0): it has no density and is not trained on
        usable = torch.nonzero(torch.isfinite(batch.extras["logp"]).all(0).all(0)).flatten()
        n_steps = max(1, round(self.timestep_fraction * len(usable)))
        steps = usable[torch.randperm(len(usable))[:n_steps]].sort().values
        with backbone.rollout_autocast():  # the text encoders too run as the sampler ran them
            cond = text_conditioning(backbone, batch.prompts).repeat_interleave(2)
            uncond = backbone.unconditional(2 * b, self.guidance)
        # the sampler's log-probs stand for the reference's only when computed in this step's precision: the
        # rollouts' own autocast (train.rollout_precision) or, without one, no autocast around the step either
        same_precision = backbone.rollout_dtype is not None or not torch.is_autocast_enabled(traj.device.type)
        reuse_ref = bool(batch.extras["reuse_ref"]) and same_precision
        losses, rho = [], []
        for s in steps.tolist():
            x_t = traj[:, :, s].flatten(0, 1)
            x_prev = traj[:, :, s + 1].flatten(0, 1)
            t = timesteps[s].to(x_t.device)
            kw = dict(steps=self.steps, eta=self.eta, uncond=uncond, guidance=self.guidance)
            with backbone.rollout_autocast():
                logp = backbone.step_logprob(x_t, x_prev, t, cond, **kw).view(b, 2)
                if reuse_ref:
                    ref = batch.extras["logp"][:, :, s].to(logp)
                else:
                    with torch.no_grad(), backbone.reference():
                        ref = backbone.step_logprob(x_t, x_prev, t, cond, **kw).view(b, 2)
            losses.append(d3po_loss(logp[:, 0], ref[:, 0], logp[:, 1], ref[:, 1], self.beta, self.clip_eps))
            rho.append((logp - ref).detach())
        loss = torch.stack(losses).mean()
        r = torch.stack(rho)
        return StepOutput(loss, {"implicit_acc": as_float((r[..., 0] > r[..., 1]).float()),
                                 "logratio_w": as_float(r[..., 0]), "logratio_l": as_float(r[..., 1]),
                                 "clipped": as_float((r.abs() > self.clip_eps).float())})
