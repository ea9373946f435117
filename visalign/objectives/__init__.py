"""Preference objectives: pure math (implicit rewards, heads) and one module per method.

Each method module registers itself when imported; ``registry.load_all`` finds them by walking this
package, so a new method is one new file.
"""

from .implicit import dpo_logit, implicit_reward
from .losses import (
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
from .margins import curriculum_order, difficulty_weights, margin_weights

__all__ = [
    "conservative_loss", "curriculum_order", "d3po_loss", "ddo_loss", "difficulty_weights", "dpo_logit",
    "hinge_loss", "implicit_reward", "ipo_loss", "kto_loss", "listwise_loss", "mapo_loss", "margin_weights",
    "ranked_loss", "robust_loss", "sigmoid_loss", "smpo_loss", "soft_label_loss",
]
