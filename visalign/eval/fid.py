"""FID through torchmetrics with one pinned protocol: a world's feature net (``FID_FEATURES``, e.g. ShapesWorld's)
or a local Inception file."""

from __future__ import annotations

from pathlib import Path

import torch


class _Features(torch.nn.Module):
    """torchmetrics' custom-feature contract: uint8 [N, 3, H, W] -> [N, D]."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_fid(feature: str = "shapes", weights: str | None = None):
    """A torchmetrics FrechetInceptionDistance for ``feature``: a registered feature net or ``inception``.

    Protocol (written next to each number): inputs are uint8 RGB; a world's net (``shapes``) resizes inside
    itself (its ``resize``); 'inception' uses torchmetrics' FID Inception (2048-d pool3, torch-fidelity's
    resize) from the local file ``weights``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    from ..model_folders import resolve_path
    from ..registry import FID_FEATURES

    if feature == "inception":
        if not weights or not Path(weights).exists():
            raise FileNotFoundError(
                f"Inception weights not found at {weights!r}; pass --inception-weights with a local copy of "
                "pt_inception-2015-12-05-6726825d.pth (torch-fidelity's FID Inception)")
        return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights,
                                        reset_real_features=False)
    if feature not in FID_FEATURES:
        raise ValueError(f"feature={feature!r}: expected inception or one of {', '.join(FID_FEATURES.names())}")
    net = FID_FEATURES.get(feature).load(weights or resolve_path(FID_FEATURES.get(feature).default_weights))
    return FrechetInceptionDistance(feature=_Features(net), reset_real_features=False)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images if images.dtype == torch.uint8 else (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8)


@torch.no_grad()
def fid(real: torch.Tensor, fake: torch.Tensor, feature: str = "shapes", weights: str | None = None,
        batch: int = 256) -> float:
    """Fréchet distance between two image sets ([N, 3, H, W], uint8 or [0, 1] floats)."""
    metric = make_fid(feature, weights)
    for i in range(0, len(real), batch):
        metric.update(to_uint8(real[i:i + batch]), real=True)
    for i in range(0, len(fake), batch):
        metric.update(to_uint8(fake[i:i + batch]), real=False)
    return float(metric.compute())


def protocol(feature: str, weights: str | None, n_real: int, n_fake: int) -> dict:
    from ..registry import FID_FEATURES

    world = FID_FEATURES.get(feature) if feature != "inception" else None
    return {"tool": "torchmetrics.image.fid.FrechetInceptionDistance", "feature": feature,
            "feature_weights": weights or (world.default_weights if world else None),
            "resize": world.resize if world else "torch-fidelity bilinear (TF1-compatible) to 299x299",
            "n_real": n_real, "n_fake": n_fake}
