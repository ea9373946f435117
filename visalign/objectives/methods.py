"""Imports every method module so each registers itself."""

from . import d3po, ddo, diffusion_dpo, disco, grpo, inpo, kto, mapo, pair_heads, rankdpo, smpo  # noqa: F401
