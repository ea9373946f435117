"""Registered pairwise heads: config names for the pure losses in ``heads.py`` (``objective.head=ipo``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..registry import HEADS
from . import losses


class PairHead:
    """Maps the DPO logit h (and the soft preference p = P(w ≻ l)) to per-pair losses.

    Most heads need only h = r_w − r_l; a head that needs each image's implicit reward (f-DPO) or the
    pair's scores (ADPO) overrides ``pair_loss``. A head that keeps state across batches (β-DPO)
    returns it from ``state_dict`` so that checkpoints restore it; ``metrics`` are logged each step.
    """

    def __call__(self, h: Tensor, p: Tensor) -> Tensor:
        raise NotImplementedError

    def pair_loss(self, r_w: Tensor, r_l: Tensor, p: Tensor, scores: Tensor | None = None) -> Tensor:
        return self(r_w - r_l, p)

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        pass


@HEADS.register("sigmoid")
class Sigmoid(PairHead):
    """−log σ(h): Diffusion-DPO's own head."""

    def __call__(self, h, p):
        return losses.sigmoid_loss(h)


@HEADS.register("hinge")
class Hinge(PairHead):
    """max(0, 1 − h): SLiC-style hinge."""

    def __call__(self, h, p):
        return losses.hinge_loss(h)


@HEADS.register("ipo")
@dataclass
class IPO(PairHead):
    """(h − 1/(2τ))²: IPO, a fixed target margin instead of an unbounded push."""

    tau: float = 0.1

    def __call__(self, h, p):
        return losses.ipo_loss(h, self.tau)


@dataclass
class LabelNoiseHead(PairHead):
    """A head told the labels' flip rate eps: cDPO smooths with it, rDPO corrects for it."""

    eps: float = 0.1


@HEADS.register("conservative")
class Conservative(LabelNoiseHead):
    """cDPO / label smoothing with rate eps."""

    def __call__(self, h, p):
        return losses.conservative_loss(h, self.eps)


@HEADS.register("robust")
class Robust(LabelNoiseHead):
    """rDPO: unbiased under a known label-flip rate eps < 0.5."""

    def __post_init__(self):
        if not 0.0 <= self.eps < 0.5:
            raise ValueError(f"objective.head.eps={self.eps}: a label-flip rate in [0, 0.5) is expected")

    def __call__(self, h, p):
        return losses.robust_loss(h, self.eps)


@HEADS.register("soft_label")
class SoftLabel(PairHead):
    """Cross-entropy with the pair's soft preference p (keeps ties when data.drop_ties=false)."""

    def __call__(self, h, p):
        return losses.soft_label_loss(h, p)


@HEADS.register("smpo")
@dataclass
class SmPO(PairHead):
    """SmPO's smoothed objective −log σ(g(2p−1)h) with p from reward scores."""

    gain: float = 10.0

    def __call__(self, h, p):
        return losses.smpo_loss(h, p, self.gain)


@HEADS.register("fdpo")
class FDPO(PairHead):
    """f-DPO: −log σ(β[f′(u_w) − f′(u_l)]) for reverse_kl | forward_kl | js | alpha (u = per-image log-ratio)."""

    def __init__(self, divergence: str = "js", alpha: float = 0.5, beta: float = 1.0):
        if divergence not in losses.F_DIVERGENCES:
            raise ValueError(f"objective.head.divergence={divergence!r}: expected one of "
                             f"{', '.join(losses.F_DIVERGENCES)}")
        if divergence == "alpha" and not 0.0 < alpha <= 1.0:
            raise ValueError(f"objective.head.alpha={alpha}: the α-divergence needs 0 < α <= 1")
        if beta <= 0:
            raise ValueError(f"objective.head.beta={beta}: a positive log-ratio temperature is expected")
        self.divergence, self.alpha, self.beta = divergence, alpha, beta

    def __call__(self, h, p):
        raise TypeError("the fdpo head needs each image's implicit reward: call pair_loss(r_w, r_l, p)")

    def pair_loss(self, r_w, r_l, p, scores=None):
        return losses.fdpo_loss(r_w, r_l, self.divergence, self.alpha, self.beta)


@HEADS.register("adpo")
class ADPO(PairHead):
    """Anchored DPO: KL(q ‖ softmax(r/τ)) against soft targets q (pairs or ranked lists).

    ``target``: 'scores' (q = softmax(s/τ_q) of the reward scores when the data has them, else the
    label) or 'label' (q from the pair label p, or one-hot on the best image of a list).
    """

    listwise = True

    def __init__(self, tau: float = 1.0, target: str = "scores", target_tau: float = 0.1):
        if target not in ("scores", "label"):
            raise ValueError(f"objective.head.target={target!r}: expected scores or label")
        if tau <= 0 or target_tau <= 0:
            raise ValueError("objective.head.tau and target_tau must be positive")
        self.tau, self.target, self.target_tau = tau, target, target_tau

    def __call__(self, h, p):
        q = torch.stack([p, 1.0 - p], -1)
        return losses.adpo_loss(torch.stack([h, torch.zeros_like(h)], -1), q, self.tau)

    def pair_loss(self, r_w, r_l, p, scores=None):
        if self.target == "scores" and scores is not None:
            p = torch.sigmoid((scores[:, 0] - scores[:, 1]).to(r_w) / self.target_tau)
        return self(r_w - r_l, p)

    def list_loss(self, r: Tensor, scores: Tensor) -> Tensor:
        if self.target == "scores":
            q = torch.softmax(scores.to(r) / self.target_tau, -1)
        else:
            q = torch.nn.functional.one_hot(scores.argmax(-1), r.shape[-1]).to(r)
        return losses.adpo_loss(r, q, self.tau)


@HEADS.register("beta_dpo")
class BetaDPO(PairHead):
    """β-DPO: β scaled per batch by 1 + α(M̄ − M₀) over the pairs kept by a Gaussian filter around M₀.

    M_i = h_i (the implicit reward margin); M₀ and σ are moving averages (momentum ``momentum``) of the
    batch mean and spread; a share ``keep`` of each batch is drawn with p_i ∝ exp(−(M_i − M₀)²/2σ²).
    Logged: ``beta_scale`` (β_batch/β₀) and ``margin_m0``.
    """

    def __init__(self, alpha: float = 0.5, keep: float = 0.8, momentum: float = 0.9):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"objective.head.keep={keep}: a share in (0, 1] is expected")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"objective.head.momentum={momentum}: expected 0 <= momentum < 1")
        self.alpha, self.keep, self.momentum = alpha, keep, momentum
        self.m0: float | None = None
        self.sigma = 1.0
        self.scale = 1.0

    def __call__(self, h, p):
        m = h.detach().float()
        mean, spread = float(m.mean()), float(m.std()) if m.numel() > 1 else 1.0
        if self.m0 is None:
            self.m0, self.sigma = mean, max(spread, 1e-6)
        else:
            self.m0 = self.momentum * self.m0 + (1.0 - self.momentum) * mean
            self.sigma = self.momentum * self.sigma + (1.0 - self.momentum) * max(spread, 1e-6)
        n_keep = max(1, round(self.keep * m.numel()))
        probs = losses.gaussian_keep_probs(m, self.m0, self.sigma)
        kept = torch.multinomial(probs, n_keep, replacement=False)
        mask = torch.zeros_like(h).index_fill_(0, kept.to(h.device), 1.0)
        self.scale = losses.dynamic_beta_scale(float(m[kept].mean()), self.m0, self.alpha)
        return losses.sigmoid_loss(self.scale * h) * mask * (m.numel() / n_keep)

    def metrics(self):
        return {"beta_scale": self.scale, "margin_m0": self.m0 if self.m0 is not None else 0.0}

    def state_dict(self):
        return {"m0": self.m0, "sigma": self.sigma}

    def load_state_dict(self, state):
        self.m0, self.sigma = state.get("m0"), state.get("sigma", 1.0)


def build_head(spec) -> PairHead:
    """A head from a name, a {name, **kwargs} mapping or a config Component."""
    if isinstance(spec, PairHead):
        return spec
    if isinstance(spec, str):
        return HEADS.build(spec)
    if isinstance(spec, dict):
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        return HEADS.build(spec["name"], **kwargs)
    return HEADS.build(spec.name, **spec.kwargs)
