"""Reward win-rates of model A over baseline B on paired samples (same prompt, same seed): the statistics
live in eval/stats.py and are re-exported here for the commands and scripts that name them."""

from __future__ import annotations

from .stats import paired_term_changes, win_rate, win_rate_z  # noqa: F401
