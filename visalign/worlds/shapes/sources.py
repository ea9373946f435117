"""What ShapesWorld provides to generic code: its preset, its prompt splits and its exact renders as real images.

``shapes:train|eval|all`` names a split wherever prompts or real images are read (make-dataset, eval, FID,
online methods); generic code finds these through the ``PROMPT_SOURCES`` and ``REAL_IMAGES`` registries.
"""

from __future__ import annotations

from ...errors import UserError
from ...registry import METADATA_SOURCES, PROMPT_SOURCES, REAL_IMAGES, register_preset

SPLITS = ("train", "eval", "all")

# `visalign finetune shapes`: the shipped base. Sampling guidance is what its folder declares
# (visalign_sampling.json: 1.5), not set here.
register_preset("shapes", {"model": {"name": "pixel", "path": "assets/shapes-base"},
                           "objective": {"name": "diffusion_dpo", "beta": 5000.0},
                           "train": {"lr": 1e-4, "sample_steps": 20}})


def _split(spec: str, where: str) -> str:
    if spec not in SPLITS:
        raise UserError(f"{where}: unknown ShapesWorld split {spec!r}; expected shapes:train, shapes:eval or "
                        "shapes:all")
    return spec


@PROMPT_SOURCES.register("shapes")
def shapes_prompts(spec: str, where: str = "shapes") -> list[str]:
    """ShapesWorld's prompts of a split (GenEval templates over its shapes and colours)."""
    from .render import prompt_records

    return [r["prompt"] for r in prompt_records(_split(spec, where))]


@REAL_IMAGES.register("shapes")
def shapes_renders(spec: str, n: int, seed: int = 0, where: str = "shapes"):
    """``n`` exact renders of a split's prompts (cycled), [N, 3, H, W] uint8."""
    import numpy as np
    import torch

    from .render import prompt_records, render

    records = prompt_records(_split(spec, where))
    imgs = [render(records[i % len(records)], seed * 1_000_003 + i)[0] for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


@METADATA_SOURCES.register("shapes")
def shapes_metadata(spec: str, where: str = "--metadata") -> list[dict]:
    """ShapesWorld's GenEval metadata records of a split (``--metadata shapes:eval``)."""
    from .render import prompt_records

    return prompt_records(_split(spec, where))
