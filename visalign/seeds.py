"""Seeds derived from names: every sampled image, evaluation sample and online round gets its own seed from
the run's seed and where it sits, so that any one of them can be redrawn alone, on any process, in any order."""

from __future__ import annotations

import zlib


def derived_seed(*parts: object) -> int:
    """A 32-bit seed from ``parts`` (CRC-32 of their '/'-joined text): stable across runs, platforms, Pythons."""
    return zlib.crc32("/".join(map(str, parts)).encode())
