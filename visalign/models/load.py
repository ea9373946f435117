"""Loading diffusers/transformers components from a local folder or a hub id, safetensors only."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelLoadError, spelled
from ..model_folders import (  # noqa: F401  (re-exported: where model code and scripts have always found them)
    REPO_ROOT,
    SAMPLING_FILE,
    declared_sampling,
    default_guidance,
    resolve_path,
    sampling_guidance,
)


def load_component(cls, path: str, subfolder: str | None = None, *, what: str, key: str = "model.path",
                   trust_remote_code: bool = False, **kwargs):
    """``cls.from_pretrained(path, subfolder)`` with safetensors only and one clear error on failure."""
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.exists():
        raise ModelLoadError(f"{what}: no folder at {path!r}; pass {spelled(key)}<a local diffusers folder> "
                             "or a hub id such as stabilityai/stable-diffusion-xl-base-1.0")
    extra = {"subfolder": subfolder} if subfolder else {}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        return cls.from_pretrained(str(local) if looks_local else path, **extra, **kwargs)
    except (OSError, ValueError) as e:
        where = f"{path}/{subfolder}" if subfolder else path
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"{what}: could not load {cls.__name__} from {where!r} ({first[:200]}). Pass {spelled(key)}<a local "
            "folder with safetensors weights> or a hub id while online (HF_HUB_OFFLINE unset); "
            "pickle (.bin/.ckpt) weights are refused.") from None


def load_diffusers(cls, path: str, subfolder: str | None = None, *, what: str, **kwargs):
    """A diffusers model or scheduler; models are asked for safetensors explicitly."""
    if "Scheduler" not in cls.__name__:
        kwargs.setdefault("use_safetensors", True)
    return load_component(cls, path, subfolder, what=what, **kwargs)


def load_transformers(cls, path: str, subfolder: str | None = None, *, what: str, **kwargs):
    """A transformers model (safetensors only) or tokenizer."""
    if "Tokenizer" not in cls.__name__:
        kwargs.setdefault("use_safetensors", True)
    return load_component(cls, path, subfolder, what=what, **kwargs)


def detect_backbone(path: str) -> str:
    """The backbone name for a local diffusers folder: the family whose ``pipeline_class`` its
    model_index.json names."""
    from ..registry import BACKBONES

    by_pipeline = {getattr(BACKBONES.get(n), "pipeline_class", None): n for n in BACKBONES.names()}
    index = Path(path) / "model_index.json"
    if not index.exists():
        raise ModelLoadError(f"{path}: no model_index.json; name the backbone explicitly as NAME=PATH "
                             f"(one of {', '.join(BACKBONES.names())})")
    cls = json.loads(index.read_text()).get("_class_name", "")
    if cls not in by_pipeline:
        raise ModelLoadError(f"{path}: pipeline class {cls!r} has no backbone; name it as NAME=PATH")
    return by_pipeline[cls]


def native_bf16(device="cpu") -> bool:
    """Whether bf16 runs natively on ``device``: a CUDA GPU that supports it, or a CPU with AMX or AVX512-BF16.

    Elsewhere torch emulates bf16 on the CPU: the ShapesWorld UNet then samples about 17x slower than in
    fp32 (measured on a 2-core AVX2 machine), so callers choosing bf16 for speed should fall back to fp32.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: trust torch's own CPU capability report
        return "AMX" in str(torch.backends.cpu.get_cpu_capability()).upper()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def build_backbone(model, **extra):
    """The backbone a config ``Component`` names (its ``path`` resolved: a folder, or a hub id while online)."""
    from ..registry import BACKBONES

    kwargs = dict(model.kwargs) | extra
    if "path" in kwargs:
        kwargs["path"] = resolve_path(kwargs["path"])
    return BACKBONES.build(model.name, **kwargs)


def ready_for_sampling(backbone, lora: str | None = None, bf16: bool = False):
    """``backbone`` (with the LoRA folder ``lora`` loaded, if given) on the sampling device, in eval mode,
    sampling under bf16 autocast when asked: what every command that generates needs."""
    import torch

    if lora:
        from .lora import load_lora

        load_lora(backbone, lora)
    if not getattr(backbone, "renders_on_cpu", False):  # a renderer draws on the CPU
        backbone.to_device(sampling_device(), include_denoiser=True)
    backbone.unwrapped().eval()
    backbone.sample_dtype = torch.bfloat16 if bf16 else None
    return backbone


def for_sampling(name: str, path: str, lora: str | None = None, bf16: bool = False, **kwargs):
    """The registered backbone ``name`` loaded from ``path`` and made ready for sampling."""
    from ..config import Component

    return ready_for_sampling(build_backbone(Component(name, {"path": path, **kwargs})), lora, bf16)


def sampling_device():
    """Where sampling (make-dataset, eval, the demo) runs: ``VISALIGN_DEVICE`` if set, else this process's GPU
    (``LOCAL_RANK`` under ``accelerate launch``), else the CPU."""
    import os

    import torch

    from ..registry import ConfigError

    if name := os.environ.get("VISALIGN_DEVICE"):
        try:
            return torch.device(name)
        except RuntimeError as e:
            raise ConfigError(f"VISALIGN_DEVICE={name!r} is not a torch device "
                              "(expected e.g. cpu, cuda, cuda:1)") from e
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def bf16_is_emulated(device) -> bool:
    """Whether bf16 compute on ``device`` lacks hardware support: a CPU without AVX512-BF16 or AMX, where bf16
    convolutions and matmuls run far slower than fp32 (measured 20x on an AVX2 machine, docs/results.md)."""
    import torch

    if torch.device(device).type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False  # not Linux: no way to tell, no warning
    return "avx512_bf16" not in flags and "amx_bf16" not in flags
