"""Registered pairwise heads: config names for the pure losses in ``heads.py`` (``objective.head=ipo``)."""

from __future__ import annotations

from torch import Tensor

from ..registry import HEADS
from . import heads


class PairHead:
    """Maps the DPO logit h (and the soft preference p = P(w ≻ l)) to per-pair losses."""

    def __call__(self, h: Tensor, p: Tensor) -> Tensor:
        raise NotImplementedError


@HEADS.register("sigmoid")
class Sigmoid(PairHead):
    """−log σ(h): Diffusion-DPO's own head."""

    def __call__(self, h, p):
        return heads.sigmoid_loss(h)


@HEADS.register("hinge")
class Hinge(PairHead):
    """max(0, 1 − h): SLiC-style hinge."""

    def __call__(self, h, p):
        return heads.hinge_loss(h)


@HEADS.register("ipo")
class IPO(PairHead):
    """(h − 1/(2τ))²: IPO, a fixed target margin instead of an unbounded push."""

    def __init__(self, tau: float = 0.1):
        self.tau = tau

    def __call__(self, h, p):
        return heads.ipo_loss(h, self.tau)


@HEADS.register("conservative")
class Conservative(PairHead):
    """cDPO / label smoothing with rate eps."""

    def __init__(self, eps: float = 0.1):
        self.eps = eps

    def __call__(self, h, p):
        return heads.conservative_loss(h, self.eps)


@HEADS.register("robust")
class Robust(PairHead):
    """rDPO: unbiased under a known label-flip rate eps < 0.5."""

    def __init__(self, eps: float = 0.1):
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"objective.head.eps={eps}: a label-flip rate in [0, 0.5) is expected")
        self.eps = eps

    def __call__(self, h, p):
        return heads.robust_loss(h, self.eps)


@HEADS.register("soft_label")
class SoftLabel(PairHead):
    """Cross-entropy with the pair's soft preference p (keeps ties when data.drop_ties=false)."""

    def __call__(self, h, p):
        return heads.soft_label_loss(h, p)


@HEADS.register("smpo")
class SmPO(PairHead):
    """SmPO's smoothed objective −log σ(g(2p−1)h) with p from reward scores."""

    def __init__(self, gain: float = 10.0):
        self.gain = gain

    def __call__(self, h, p):
        return heads.smpo_loss(h, p, self.gain)


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
