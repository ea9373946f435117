"""FID through torchmetrics with one pinned protocol: the ShapesWorld feature net or a local Inception file."""

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
    """A torchmetrics FrechetInceptionDistance for ``feature`` = shapes (the ShapesWorld net) or inception.

    Protocol (written next to each number): inputs are uint8 RGB; 'shapes' resizes to 32x32
    (bilinear, antialiased) inside the net; 'inception' uses torchmetrics' FID Inception (2048-d pool3,
    torch-fidelity's resize) from the local file ``weights``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature == "shapes":
        from ..models.load import resolve_path
        from ..worlds.shapes.features import load_feature_net

        net = load_feature_net(weights or resolve_path("assets/shapes-features"))
        return FrechetInceptionDistance(feature=_Features(net), reset_real_features=False)
    if feature == "inception":
        if not weights or not Path(weights).exists():
            raise FileNotFoundError(
                f"Inception weights not found at {weights!r}; pass --inception-weights with a local copy of "
                "pt_inception-2015-12-05-6726825d.pth (torch-fidelity's FID Inception)")
        return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights,
                                        reset_real_features=False)
    raise ValueError(f"feature={feature!r}: expected shapes or inception")


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
    return {"tool": "torchmetrics.image.fid.FrechetInceptionDistance", "feature": feature,
            "feature_weights": weights or ("assets/shapes-features" if feature == "shapes" else None),
            "resize": "bilinear antialiased to 32x32 inside the net" if feature == "shapes"
            else "torch-fidelity bilinear (TF1-compatible) to 299x299", "n_real": n_real, "n_fake": n_fake}
