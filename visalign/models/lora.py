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
    use_dora: bool = False
    rank_pattern: dict | None = None  # {module: rank}, peft's per-module ranks
    alpha_pattern: dict | None = None


def add_lora(backbone, spec: LoraSpec) -> None:
    """Attach a LoRA adapter to the denoiser, freeze the base weights, and make ``reference()`` use adapters-off."""
    from peft import LoraConfig

    model = backbone.unwrapped()
    model.requires_grad_(False)
    init = {"true": True, "false": False}.get(str(spec.init).lower(), spec.init)
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, init_lora_weights=init,
                     target_modules=list(spec.targets), use_dora=spec.use_dora,
                     rank_pattern=dict(spec.rank_pattern or {}), alpha_pattern=dict(spec.alpha_pattern or {}))
    if hasattr(model, "add_adapter"):  # diffusers' PeftAdapterMixin
        model.add_adapter(cfg)
    else:  # a denoiser without it (PixArt): peft's own injection, same layers and keys
        from peft import inject_adapter_in_model

        inject_adapter_in_model(cfg, model, adapter_name="default")
    for p in model.parameters():
        if p.requires_grad:  # peft leaves only the adapter trainable; keep it in float32 for AdamW
            p.data = p.data.float()
    backbone.uses_lora = True
    backbone.lora_config = cfg


def set_adapters_enabled(model: torch.nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer of ``model`` on or off (the reference is 'adapters off')."""
    if hasattr(model, "enable_adapters"):
        model.enable_adapters() if enabled else model.disable_adapters()
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)


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
        if hasattr(model, "load_lora_adapter"):
            model.load_lora_adapter(str(file.parent), weight_name=file.name, prefix=prefix, adapter_name="default")
        else:
            inject_saved_lora(model, file, prefix)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"--lora {file}: does not fit this {backbone.family} model ({first_line(e)})") from None
    backbone.uses_lora = True


def inject_saved_lora(model: torch.nn.Module, file: Path, prefix: str) -> None:
    """A diffusers-format LoRA file onto a model without diffusers' loader (PixArt), with plain peft: the
    config from the file's adapter metadata (else rank from the shapes, alpha = rank), then the weights."""
    import json

    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    from .export import read_lora_file

    state, meta = read_lora_file(file)
    state = {k[len(prefix) + 1:]: v for k, v in convert_all_state_dict_to_peft(state).items()
             if k.startswith(prefix + ".")}
    saved = next((json.loads(v) for k, v in meta.items() if k.endswith("lora_adapter_metadata")), None)
    if saved is not None:
        saved = {k.split(".", 1)[-1]: v for k, v in saved.items()}
        cfg = LoraConfig(r=saved["r"], lora_alpha=saved["lora_alpha"], target_modules=saved["target_modules"])
    else:
        rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules)
    inject_adapter_in_model(cfg, model, adapter_name="default")
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"unexpected LoRA keys {result.unexpected_keys[:3]}")
