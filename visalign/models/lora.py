"""LoRA through peft on a backbone's denoiser, saved in diffusers format (``pipe.load_lora_weights``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, first_line

# which diffusers pipeline writes (and reads) each family's LoRA file, and its key prefix
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class LoraSpec:
    """LoRA hyper-parameters (peft ``LoraConfig``)."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    init: str = "gaussian"  # peft init_lora_weights: gaussian | true (B = 0) | pissa ...


def add_lora(backbone, spec: LoraSpec) -> None:
    """Attach a LoRA adapter to the denoiser, freeze the base weights, and make ``reference()`` use adapters-off."""
    from peft import LoraConfig

    model = backbone.unwrapped()
    model.requires_grad_(False)
    init = {"true": True, "false": False}.get(str(spec.init).lower(), spec.init)
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, init_lora_weights=init,
                     target_modules=list(spec.targets))
    model.add_adapter(cfg)
    for p in model.parameters():
        if p.requires_grad:  # peft leaves only the adapter trainable; keep it in float32 for AdamW
            p.data = p.data.float()
    backbone.uses_lora = True
    backbone.lora_config = cfg


def lora_state_dict(backbone) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(backbone.unwrapped()))


def save_lora(backbone, out_dir: str | Path) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` with adapter metadata, so alpha ≠ rank survives a reload."""
    import diffusers

    cls_name, prefix = backbone.lora_pipeline, backbone.lora_prefix  # each family says how diffusers saves it
    writer = getattr(diffusers, cls_name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(backbone).items()}
    writer.save_lora_weights(out_dir, safe_serialization=True, **{
        f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": backbone.lora_config.to_dict()})
    return out_dir / "pytorch_lora_weights.safetensors"


def load_lora(backbone, lora_dir: str | Path) -> None:
    """Load a diffusers-format LoRA (as written by ``save_lora``) onto the backbone's denoiser."""
    prefix = backbone.lora_prefix
    from .export import read_lora_file

    path = Path(lora_dir)
    file = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
    read_lora_file(file)  # a missing, truncated or non-LoRA file is one error naming it
    model = backbone.unwrapped()
    try:
        model.load_lora_adapter(str(file.parent), weight_name=file.name, prefix=prefix, adapter_name="default")
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"--lora {file}: does not fit this {backbone.family} model ({first_line(e)})") from None
    backbone.uses_lora = True
