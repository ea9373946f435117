"""Rounds for online methods: sample with the current model, score, train on the round's data, repeat.

The same sample -> score -> rank path as make-dataset (``rewards.base.score_and_rank``). A round is a pure
function of (seed, round index, model state at its start); with ``reset_reference`` the DPO
reference becomes a frozen copy of the policy at each round start (D3PO's paper, DDO's self-play).
"""

from __future__ import annotations

import logging

import torch

from ..errors import UserError
from ..seeds import derived_seed

log = logging.getLogger(__name__)


class PromptPool(list):
    """The run's prompts, with their task tags when the source has them (GenEval metadata, a world's split).

    ``draw`` picks prompts uniformly, or with ``task_weights`` a task first (by weight; a task not named weighs
    1, 0 leaves it out) and then a prompt of it uniformly: rounds balanced by task, counting weighted up as an
    option. Without weights the draw is the one every earlier run made (one randint), so runs replay.
    """

    def __init__(self, prompts: list[str], tags: list[str] | None = None, task_weights: dict | None = None):
        super().__init__(prompts)
        self.tags, self.task_weights = tags, dict(task_weights or {})
        if self.task_weights:
            if tags is None:
                raise UserError("data.task_weights needs prompts with task tags: a GenEval metadata .jsonl (its "
                                "'tag' field) or a world's split such as shapes:train")
            known = sorted(set(tags))
            for task in self.task_weights:
                if task not in known:
                    raise UserError(f"data.task_weights.{task}: no prompt has that task; tasks: {', '.join(known)}")
            self.tasks = [t for t in known if self.task_weights.get(t, 1.0) > 0]
            if not self.tasks:
                raise UserError("data.task_weights: every task has weight 0")
            self.by_task = {t: [i for i, g in enumerate(tags) if g == t] for t in self.tasks}
            self.probs = torch.tensor([float(self.task_weights.get(t, 1.0)) for t in self.tasks])

    def draw(self, n: int, gen: torch.Generator) -> list[str]:
        if not self.task_weights:
            return [self[i] for i in torch.randint(0, len(self), (n,), generator=gen).tolist()]
        picks = torch.multinomial(self.probs, n, replacement=True, generator=gen).tolist()
        out = []
        for k in picks:
            members = self.by_task[self.tasks[k]]
            out.append(self[members[int(torch.randint(0, len(members), (1,), generator=gen))]])
        return out


def draw_prompts(prompts, n: int, gen: torch.Generator) -> list[str]:
    """``n`` prompts for a round: the pool's own draw (balanced by task when configured), else uniform."""
    if isinstance(prompts, PromptPool):
        return prompts.draw(n, gen)
    return [prompts[i] for i in torch.randint(0, len(prompts), (n,), generator=gen).tolist()]


def round_seed(seed: int, round_idx: int, rank: int) -> int:
    return derived_seed("round", seed, round_idx, rank)


class RoundSource:
    """Serves micro-batches from the current round; builds a new round every ``round_steps`` optimizer steps."""

    def __init__(self, method, backbone, prompts: list[str], batch_size: int, grad_accum: int, seed: int,
                 rank: int = 0, world: int = 1):
        if not prompts:
            raise ValueError("an online method needs prompts (data.path: a prompt file, a dataset or a world's split)")
        self.method, self.backbone, self.prompts = method, backbone, prompts
        self.batch_size, self.grad_accum, self.seed, self.rank, self.world = batch_size, grad_accum, seed, rank, world
        self.round_idx, self.items = -1, None
        self.ties_dropped = self.corrupt_skipped = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def at_boundary(self, step: int) -> bool:
        """Whether optimizer step ``step`` ends a round: checkpoints wait for it, because a round is sampled
        from the model at its start, which a checkpoint taken mid-round no longer holds."""
        return step % self.method.round_steps == 0

    def batch(self, micro_step: int):
        r = micro_step // (self.method.round_steps * self.grad_accum)
        if r != self.round_idx:
            gen = torch.Generator().manual_seed(round_seed(self.seed, r, self.rank))
            if self.method.reset_reference and r > 0:
                self.backbone.freeze_reference_copy()
            with torch.no_grad(), self.backbone.sampling_mode(), self.backbone.rollout_sampling():
                self.items = self.method.make_round(self.backbone, self.prompts, gen, r)
            self.round_idx = r
            log.info("online round %d: %d items", r, self.method.round_size(self.items))
        n = self.method.round_size(self.items)
        g = torch.Generator().manual_seed(round_seed(self.seed, micro_step, self.rank) + 1)
        idx = torch.randint(0, n, (self.batch_size,), generator=g)
        batch = self.method.take(self.items, idx)
        if batch is not None:  # the round's own figures (its mean reward: the training-prompt reward curve)
            batch.log = dict(self.items.get("log", {}))
        return batch
