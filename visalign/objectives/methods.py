"""Imports every method module so each registers itself."""

from . import diffusion_dpo, kto, mapo, pair_heads  # noqa: F401
