"""What ShapesWorld provides to generic code: its preset, prompt splits, GenEval metadata, exact renders as real
images (for FID, and one per prompt for DDO), FID feature net and caption vocabulary.

``shapes:train|eval|all`` names a split wherever prompts or real images are read (make-dataset, eval, FID,
online methods); generic code finds each through its registry (``PROMPT_SOURCES``, ``REAL_IMAGES``, ...).
"""

from __future__ import annotations

from ...errors import UserError
from ...registry import (
    FID_FEATURES,
    METADATA_SOURCES,
    PROMPT_SOURCES,
    REAL_FOR_PROMPTS,
    REAL_IMAGES,
    VOCABULARIES,
    register_preset,
)

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


shapes_prompts.specs = SPLITS  # what error messages offer: shapes:train|eval|all


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


@FID_FEATURES.register("shapes")
class ShapesFeatures:
    """ShapesWorld's FID features: a small net trained to tell its shapes, colours and counts apart."""

    default_weights = "assets/shapes-features"
    resize = "bilinear antialiased to 32x32 inside the net"

    @staticmethod
    def load(weights: str):
        from .features import load_feature_net

        return load_feature_net(weights)


@VOCABULARIES.register("shapes")
def shapes_words() -> list[str]:
    """Every word a ShapesWorld caption can contain (its tokenizer's vocabulary)."""
    from .vocab import caption_words

    return caption_words()


@REAL_FOR_PROMPTS.register("shapes")
def shapes_real_images(spec: str, prompts: list[str], gen, size: int = 32, where: str = "shapes"):
    """ShapesWorld 'real data': an exact render of each prompt, in [0, 1], resized to ``size`` if needed."""
    import numpy as np
    import torch

    from .detector import record_for_prompt
    from .render import render

    seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=gen).tolist()
    imgs = [render(record_for_prompt(p), s)[0] for p, s in zip(prompts, seeds)]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x
