"""Iterative on-policy Diffusion-DPO (DNO-style batched rounds): sample K images per prompt from the current
policy, rank them by the reward, train any pairwise head on best-vs-worst (or every margin) pair, and reset
the reference to the policy at each round start."""

from __future__ import annotations

import torch

from ..registry import METHODS
from ..rewards.base import score_and_rank
from ..types import PreferenceBatch, StepOutput
from .base import OnlineMethod
from .diffusion_dpo import DiffusionDPO


@METHODS.register("online_dpo")
class OnlineDPO(OnlineMethod):
    """Iterative on-policy DPO: rounds of K samples per prompt, reward-ranked pairs, reference reset per round.

    ``pairs``: 'best-worst' (one pair per prompt) or 'all' (every pair at least ``min_margin`` apart).
    The loss is Diffusion-DPO's with any pairwise head; ``reset_reference`` makes round r's reference the
    policy at its start (DNO, iterative DPO), so each round is a small step from the last.
    """

    needs = ("sample",)

    def __init__(self, beta: float = 5000.0, head: str | dict = "sigmoid", samples_per_prompt: int = 4,
                 prompts_per_round: int = 32, round_steps: int = 8, steps: int = 20, guidance: float | None = None,
                 pairs: str = "best-worst", min_margin: float = 0.1, reset_reference: bool = True,
                 reward: str | dict = "constraints"):
        from ..rewards.base import LazyReward

        if pairs not in ("best-worst", "all"):
            raise ValueError(f"online_dpo.pairs={pairs!r}: expected best-worst or all")
        self.dpo = DiffusionDPO(beta, head)
        self.k, self.prompts_per_round, self.round_steps = samples_per_prompt, prompts_per_round, round_steps
        self.steps, self.guidance, self.pairs, self.min_margin = steps, guidance, pairs, min_margin
        self.reset_reference = reset_reference
        self.reward = LazyReward(reward)

    def make_round(self, backbone, prompts, gen: torch.Generator, round_idx: int = 0) -> dict:
        """K samples per prompt with the current policy (the evaluation's sampler), ranked; pairs kept by margin."""
        if self.guidance is None:
            raise ValueError("online_dpo.guidance is unset: the trainer passes train.guidance")
        chosen = [prompts[i] for i in torch.randint(0, len(prompts), (self.prompts_per_round,), generator=gen)]
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
        return {"images": pairs, "prompts": captions, "reward_mean": float(scores.mean())}

    def round_size(self, items: dict) -> int:
        return max(1, len(items["prompts"]))

    def take(self, items: dict, idx: torch.Tensor) -> PreferenceBatch | None:
        if not items["prompts"]:
            return None
        idx = idx % len(items["prompts"])
        return PreferenceBatch(prompts=[items["prompts"][i] for i in idx.tolist()], label=torch.ones(len(idx)),
                               images=items["images"][idx],
                               extras={"reward_mean": torch.full((len(idx),), items["reward_mean"])})

    def __call__(self, backbone, batch: PreferenceBatch) -> StepOutput:
        out = self.dpo(backbone, batch)
        out.metrics["reward_mean"] = float(batch.extras["reward_mean"][0])
        return out
