"""RankDPO (Karthik et al. 2024): ranked lists, per-image implicit rewards at one shared (t, ε) per list."""

from __future__ import annotations

from ..registry import METHODS
from ..types import PreferenceBatch, StepOutput, as_float
from .base import Method, denoising_errors, model_inputs
from .implicit import implicit_reward
from .losses import ranked_loss
from .pair_heads import build_head


@METHODS.register("rankdpo")
class RankDPO(Method):
    """RankDPO: ΔDCG-weighted pairwise DPO over each ranked list (Syn-Pic-style data, K ≥ 2 images).

    ``head``: 'dcg' (RankDPO's own loss) or any listwise head (``adpo``: KL to soft targets over the list).
    """

    data = "lists"

    def __init__(self, beta: float = 5000.0, head: str | dict = "dcg"):
        self.beta = beta
        self.head = None if head == "dcg" else build_head(head)
        if self.head is not None and not getattr(self.head, "listwise", False):
            raise ValueError(f"rankdpo.head={head!r}: expected dcg or a listwise head (adpo)")

    def __call__(self, backbone, batch: PreferenceBatch) -> StepOutput:
        if batch.scores is None:
            raise ValueError("rankdpo needs per-image scores (the 'scores' column of a ranked-list dataset)")
        x0, cond = model_inputs(backbone, batch)
        err, ref = denoising_errors(backbone, x0, cond)
        r = implicit_reward(err, ref, self.beta)
        gt = batch.scores.to(r)
        loss = (ranked_loss(r, gt) if self.head is None else self.head.list_loss(r, gt)).mean()
        ordered = gt.unsqueeze(-1) > gt.unsqueeze(-2)
        agree = (r.unsqueeze(-1) > r.unsqueeze(-2)) & ordered
        acc = agree.sum() / ordered.sum().clamp_min(1)
        return StepOutput(loss, {"implicit_acc": as_float(acc), "reward_spread": as_float(r.std(-1)),
                                 "err_mean": as_float(err), "ref_err_mean": as_float(ref)})
