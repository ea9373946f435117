"""Labelled image grids as PNG (PIL only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..images import to_pil

__all__ = ["image_grid", "save_png", "to_pil"]  # to_pil lives in the core; eval code imports it here too


def image_grid(images: Sequence[torch.Tensor], labels: Sequence[str] | None = None, cols: int = 8,
               scale: int = 4, label_height: int = 12, border: Sequence[tuple[int, int, int] | None] | None = None
               ) -> Image.Image:
    """Tile [3, H, W] images (upscaled ``scale`` x, nearest) with an optional text label under each."""
    n = len(images)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    h, w = images[0].shape[-2:]
    cw, ch = w * scale + 4, h * scale + 4 + (label_height if labels else 0)
    grid = Image.new("RGB", (cols * cw, rows * ch), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % cols) * cw, (i // cols) * ch
        if border and border[i]:
            draw.rectangle([x, y, x + w * scale + 3, y + h * scale + 3], fill=border[i])
        grid.paste(to_pil(img).resize((w * scale, h * scale), Image.NEAREST), (x + 2, y + 2))
        if labels:
            draw.text((x + 2, y + h * scale + 4), labels[i][: max(4, cw // 6)], fill=(0, 0, 0))
    return grid


def save_png(img: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path
