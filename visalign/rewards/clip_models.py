"""Rewards built on CLIP-style models: CLIPScore, PickScore, HPSv2 and the LAION aesthetic predictor.

Heavy imports happen inside each constructor. Weights come from a local path or a hub id / open_clip
tag; when they cannot be loaded the error names the reward and the argument to pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import spelled
from ..models.load import ModelLoadError
from ..registry import REWARDS

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images: Tensor, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> CLIP input: bicubic resize of the short side, centre crop, normalise."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(images.float(), size=(max(size, round(h * scale)), max(size, round(w * scale))),
                      mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _open_clip(arch: str, pretrained: str | None, reward: str):
    try:
        import open_clip
    except ImportError:
        raise ModelLoadError(f"reward {reward}: needs open_clip (pip install 'visalign[clip]')") from None
    try:
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ModelLoadError(f"reward {reward}: could not load open_clip {arch!r} weights {pretrained!r} ({first}); "
                             f"pass {spelled(reward + '.pretrained')}<a local open_clip checkpoint file>") from None
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(arch)


def _size(model) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return size[0] if isinstance(size, (tuple, list)) else int(size)


@REWARDS.register("clip_score")
class CLIPScore:
    """CLIPScore (Hessel et al. 2021) as torchmetrics reports it: 100·max(cos(image, text), 0), open_clip."""

    name, version = "clip_score", "1"

    def __init__(self, arch: str = "ViT-B-32", pretrained: str = "openai"):
        self.model, self.tokenizer = _open_clip(arch, pretrained, "clip_score")
        self.version = f"1/{arch}/{pretrained}"

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        img = F.normalize(self.model.encode_image(clip_pixels(images, _size(self.model))).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(list(prompts))).float(), dim=-1)
        return 100.0 * (img * txt).sum(-1).clamp_min(0)


@REWARDS.register("hpsv2")
class HPSv2:
    """HPSv2 (Wu et al. 2023): cos(image, text) of an open_clip ViT-H-14 fine-tuned on HPD; checkpoint file given."""

    name, version = "hpsv2", "2.0"

    def __init__(self, checkpoint: str = "", arch: str = "ViT-H-14"):
        from pathlib import Path

        if not checkpoint or not Path(checkpoint).exists():
            raise ModelLoadError(f"reward hpsv2: checkpoint {checkpoint!r} not found; pass "
                                 f"{spelled('hpsv2.checkpoint')}"
                                 "<local HPS_v2_compressed.pt or HPS_v2.1_compressed.pt>")
        self.model, self.tokenizer = _open_clip(arch, None, "hpsv2")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state.get("state_dict", state))
        self.version = f"2.0/{Path(checkpoint).name}"

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        img = F.normalize(self.model.encode_image(clip_pixels(images, _size(self.model))).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(list(prompts))).float(), dim=-1)
        return (img * txt).sum(-1)


class AestheticMLP(torch.nn.Module):
    """The LAION aesthetic predictor head (improved-aesthetic-predictor): 768 -> 1024 -> 128 -> 64 -> 16 -> 1."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


@REWARDS.register("aesthetic")
class Aesthetic:
    """LAION aesthetic score: MLP on normalised CLIP ViT-L/14 image embeddings (prompt-independent)."""

    name, version = "aesthetic", "sac+logos+ava1-l14-linearMSE"

    def __init__(self, head: str = "", arch: str = "ViT-L-14", pretrained: str = "openai"):
        from pathlib import Path

        if not head or not Path(head).exists():
            raise ModelLoadError(f"reward aesthetic: MLP weights {head!r} not found; pass "
                                 f"{spelled('aesthetic.head')}"
                                 "<local sac+logos+ava1-l14-linearMSE.pth or .safetensors>")
        self.model, _ = _open_clip(arch, pretrained, "aesthetic")
        dim = self.model.visual.output_dim
        self.mlp = AestheticMLP(dim).eval()
        if head.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(head)
        else:
            state = torch.load(head, map_location="cpu", weights_only=True)
        self.mlp.load_state_dict(state)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        emb = F.normalize(self.model.encode_image(clip_pixels(images, _size(self.model))).float(), dim=-1)
        return self.mlp(emb).squeeze(-1)


@REWARDS.register("pickscore")
class PickScore:
    """PickScore (Kirstain et al. 2023): logit_scale·cos(image, text) of a transformers CLIPModel."""

    name, version = "pickscore", "v1"

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1",
                 processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        from ..models.load import load_transformers

        self.model = load_transformers(CLIPModel, model, what="pickscore model", key="pickscore.model").eval()
        self.tokenizer = load_transformers(AutoTokenizer, processor, what="pickscore tokenizer",
                                           key="pickscore.processor")
        ip = load_transformers(CLIPImageProcessor, processor, what="pickscore image processor",
                               key="pickscore.processor")
        crop = ip.crop_size
        size = int(crop["height"] if hasattr(crop, "__getitem__") and not isinstance(crop, int) else crop)
        self.size, self.mean, self.std = size, tuple(ip.image_mean), tuple(ip.image_std)
        self.version = f"v1/{model}"

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        pixels = clip_pixels(images, self.size, self.mean, self.std)
        ids = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        img = F.normalize(_projected(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        txt = F.normalize(_projected(self.model.get_text_features(**ids)), dim=-1)
        return self.model.logit_scale.exp() * (img * txt).sum(-1)


def _projected(out) -> Tensor:
    """transformers 5 returns the projected embedding as ``pooler_output``; 4.x returned the tensor."""
    return (out if isinstance(out, Tensor) else out.pooler_output).float()


@REWARDS.register("imagereward")
class ImageReward:
    """ImageReward (Xu et al. 2023), through the optional `image-reward` package (its own pinned deps)."""

    name, version = "imagereward", "1.0"

    def __init__(self, checkpoint: str = "ImageReward-v1.0"):
        try:
            import ImageReward as RM  # noqa: N814
        except ImportError:
            raise ModelLoadError("reward imagereward: needs the optional package image-reward (pip install "
                                 "image-reward); it pins old timm/transformers, so install it in a separate "
                                 "environment and serve it with the reward server") from None
        self.model = RM.load(checkpoint)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        from ..images import to_pil

        return torch.tensor([float(self.model.score(p, [to_pil(im)])) for im, p in zip(images, prompts)])
