"""A third-party plug-in, as a user would write it: one file, registered through the ``visalign.plugins``
entry-point group, with no edit to visalign. It adds a method and a reward."""

import torch

from visalign.objectives.base import Method, denoising_errors, model_inputs
from visalign.registry import METHODS, REWARDS
from visalign.types import PreferenceBatch, StepOutput


@METHODS.register("example_winner_sft")
class WinnerSFT(Method):
    """Example plug-in: supervised fine-tuning on the preferred image of each pair (no reference)."""

    uses_reference = False

    def __call__(self, backbone, batch: PreferenceBatch) -> StepOutput:
        x0, cond = model_inputs(backbone, batch)
        err, _ = denoising_errors(backbone, x0[:, :1], cond, reference=False)
        return StepOutput(err.mean(), {"err_w": float(err.mean())})


@REWARDS.register("example_brightness")
class Brightness:
    """Example plug-in: mean pixel brightness."""

    name, version = "example_brightness", "1"

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return images.float().mean(dim=(1, 2, 3))
