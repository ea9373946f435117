"""Image conversions every layer shares (core: imports nothing of visalign)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_pil(img: torch.Tensor) -> Image.Image:
    """A [3, H, W] tensor in [0, 1] as an 8-bit RGB PIL image (rounded, clamped)."""
    arr = (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(arr)
