"""Model adapters: one Backbone interface over diffusers UNet (SD, SDXL), flow (SD3) and pixel models.

Each family's module registers its backbone when imported; ``registry.load_all`` finds them.
"""

from .backbone import Backbone, Cond, Noised, SampleOutput

__all__ = ["Backbone", "Cond", "Noised", "SampleOutput"]
