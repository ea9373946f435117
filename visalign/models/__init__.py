"""Model adapters: one Backbone interface over diffusers UNet (SD, SDXL), flow (SD3) and pixel models."""

from . import flow, pixel, unet  # noqa: F401  (register backbones)
from .backbone import Backbone, Cond, Noised, SampleOutput

__all__ = ["Backbone", "Cond", "Noised", "SampleOutput"]
