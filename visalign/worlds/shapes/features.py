"""A small feature network trained on ShapesWorld renders, for FID in this world (``--feature shapes``).

Inception features know nothing of 32x32 coloured shapes; this net is trained to count each shape
and to see each colour, and its 128-d penultimate layer is the feature space for Fréchet distance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .render import render, sample_records
from .vocab import COLORS, SHAPES

FEATURES = 128
MAX_COUNT = 4


class ShapesFeatureNet(nn.Module):
    """uint8 or [0, 1] images [N, 3, H, W] -> features [N, 128] (``forward``) and attribute logits (``heads``)."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width

        # per-pixel colour features first (1x1 convs), then shape features; global max pooling finds small
        # objects on the plain background and average pooling keeps how many there are
        self.stem = nn.Sequential(nn.Conv2d(3, w, 1), nn.ReLU(), nn.Conv2d(w, w, 1), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU())
        self.proj = nn.Sequential(nn.Linear(9 * w, FEATURES), nn.ReLU())
        self.count_head = nn.Linear(FEATURES, len(SHAPES) * (MAX_COUNT + 1))
        self.color_head = nn.Linear(FEATURES, len(COLORS))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != 32:
            x = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        c = self.stem(x * 2 - 1)
        h = self.body(c)
        return self.proj(torch.cat([c.amax((2, 3)), h.amax((2, 3)), h.mean((2, 3)) * 4], 1))

    def heads(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.count_head(feats).view(-1, len(SHAPES), MAX_COUNT + 1), self.color_head(feats)


def _labels(objs) -> tuple[list[int], list[float]]:
    counts = [min(sum(o.shape == s for o in objs), MAX_COUNT) for s in SHAPES]
    colors = [float(any(o.color == c for o in objs)) for c in COLORS]
    return counts, colors


def render_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    imgs, counts, colors = [], [], []
    for i, r in enumerate(sample_records(n, seed)):
        img, objs = render(r, seed * 100_003 + i)
        c, col = _labels(objs)
        imgs.append(img)
        counts.append(c)
        colors.append(col)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(counts), torch.tensor(colors)


def train_feature_net(out: str | Path, steps: int = 600, batch: int = 128, seed: int = 0, lr: float = 3e-3) -> dict:
    """Train on fresh renders each step; report held-out count/colour accuracy; save safetensors + config."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    net = ShapesFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for step in range(steps):
        x, counts, colors = render_batch(batch, seed * 7919 + step)
        cl, col = net.heads(net(x))
        loss = nn.functional.cross_entropy(cl.flatten(0, 1), counts.flatten()) + \
            nn.functional.binary_cross_entropy_with_logits(col, colors)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        x, counts, colors = render_batch(1000, 99_999)
        cl, col = net.heads(net(x))
        count_acc = float((cl.argmax(-1) == counts).all(-1).float().mean())
        color_acc = float(((col > 0) == (colors > 0.5)).all(-1).float().mean())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(out / "model.safetensors"))
    meta = {"architecture": "ShapesFeatureNet", "width": 32, "features": FEATURES, "steps": steps, "batch": batch,
            "seed": seed, "held_out_count_accuracy": count_acc, "held_out_color_accuracy": color_acc}
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    return meta


def load_feature_net(path: str | Path) -> ShapesFeatureNet:
    from safetensors.torch import load_file

    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no ShapesWorld feature net at {file}; run `visalign world shapes features "
                                "--out assets/shapes-features`")
    net = ShapesFeatureNet()
    net.load_state_dict(load_file(str(file)))
    return net.eval().requires_grad_(False)
