"""Imports every method module so each registers itself."""

from . import (  # noqa: F401
    d3po,
    ddo,
    diffusion_dpo,
    disco,
    grpo,
    inpo,
    kto,
    mapo,
    online_dpo,
    pair_heads,
    rankdpo,
    smpo,
)
