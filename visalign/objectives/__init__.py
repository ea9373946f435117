"""Preference objectives: pure math (implicit rewards, heads) and one module per method."""

from .heads import (
    conservative_loss,
    d3po_loss,
    ddo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    listwise_loss,
    mapo_loss,
    ranked_loss,
    robust_loss,
    sigmoid_loss,
    smpo_loss,
    soft_label_loss,
)
from .implicit import dpo_logit, implicit_reward
from .weights import curriculum_order, difficulty_weights, margin_weights

__all__ = [
    "conservative_loss", "curriculum_order", "d3po_loss", "ddo_loss", "difficulty_weights", "dpo_logit",
    "hinge_loss", "implicit_reward", "ipo_loss", "kto_loss", "listwise_loss", "mapo_loss", "margin_weights",
    "ranked_loss", "robust_loss", "sigmoid_loss", "smpo_loss", "soft_label_loss",
]

from . import methods as _methods  # noqa: E402,F401  (registers heads and methods)
