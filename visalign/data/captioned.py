"""Captioned real images from anything ``datasets`` loads (a parquet file or folder, a save_to_disk folder, an
image folder with a metadata.jsonl, a hub id): ``images:PATH`` wherever prompt-matched real images are read
(DDO's real data). Each prompt gets one of the images captioned with it."""

from __future__ import annotations

import functools

import torch

from ..errors import UserError
from ..registry import REAL_FOR_PROMPTS

CAPTION_COLUMNS = ("prompt", "caption", "text")
IMAGE_COLUMNS = ("image", "jpg_0", "jpg")


@functools.lru_cache(maxsize=4)
def _captioned(source: str, where: str):
    """(dataset, image column, caption -> row indices), read once per source."""
    from .pairs import load_any

    ds = load_any(source)
    caption = next((c for c in CAPTION_COLUMNS if c in ds.column_names), None)
    image = next((c for c in IMAGE_COLUMNS if c in ds.column_names), None)
    if caption is None or image is None:
        raise UserError(f"{where}: {source!r} needs a caption column ({', '.join(CAPTION_COLUMNS)}) and an image "
                        f"column ({', '.join(IMAGE_COLUMNS)}); found {ds.column_names}")
    rows: dict[str, list[int]] = {}
    for i, text in enumerate(ds[caption]):
        rows.setdefault(str(text), []).append(i)
    return ds, image, rows


@REAL_FOR_PROMPTS.register("images")
def captioned_images(spec: str, prompts: list[str], gen: torch.Generator, size: int,
                     where: str = "images") -> torch.Tensor:
    """For each prompt one image captioned with it (drawn with ``gen``), [N, 3, size, size] in [0, 1]."""
    from .pairs import decode_image, prepare_image

    ds, column, rows = _captioned(spec, where)
    out = []
    for p in prompts:
        if p not in rows:
            raise UserError(f"{where}: no image in {spec!r} is captioned {p!r}; train on that dataset's captions "
                            f"(data.path={spec})")
        choices = rows[p]
        row = choices[int(torch.randint(0, len(choices), (1,), generator=gen))]
        out.append(prepare_image(decode_image(ds[row][column]), size).tensor)
    return torch.stack(out)
