"""LoRA export for other tools: Kohya-style safetensors (ComfyUI, A1111/Forge, SD.Next, InvokeAI)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError, first_line


def read_lora_file(src: Path) -> tuple[dict, dict]:
    """A LoRA safetensors file's tensors and metadata; one CheckpointError naming the file otherwise."""
    from safetensors import safe_open

    if not src.exists():
        raise CheckpointError(f"no LoRA weights at {src} (expected a folder with pytorch_lora_weights.safetensors "
                              "or a .safetensors file)")
    try:
        with safe_open(str(src), "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:  # not safetensors, truncated, or unreadable
        raise CheckpointError(f"{src}: not a readable safetensors LoRA ({first_line(e)})") from None
    if not any(".lora" in k or "lora_" in k for k in state):
        raise CheckpointError(f"{src}: holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys); "
                              "is it a base model's weights?")
    return state, meta


def export_kohya(lora_dir: str | Path, out_file: str | Path) -> Path:
    """Convert a visalign/diffusers LoRA to Kohya keys (``lora_unet_*.lora_down/up.weight`` + ``.alpha``).

    SD 1.x and SDXL get ``lora_unet_*`` (read by diffusers, ComfyUI and A1111); an SD3 transformer LoRA gets
    ``lora_transformer_*``, the naming ComfyUI maps for SD3 (``comfy/lora.py``, OneTrainer's format), which
    diffusers' own SD3 loader does not read: ``kohya_to_diffusers`` turns it back.

    The alpha tensors carry the trained ``lora_alpha`` (diffusers' converter writes alpha = rank,
    which silently rescales an adapter trained with alpha ≠ rank).
    """
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import save_file

    src = Path(lora_dir)
    src = src / "pytorch_lora_weights.safetensors" if src.is_dir() else src
    state, meta = read_lora_file(src)
    alpha = None
    for key, value in meta.items():
        if key.endswith("lora_adapter_metadata"):  # keys are prefixed: "unet.lora_alpha"
            alpha = next((v for k, v in json.loads(value).items() if k.split(".")[-1] == "lora_alpha"), None)
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(state))
    # a transformer (SD3) LoRA: ComfyUI's OneTrainer-style keys, lora_transformer_<diffusers module path with _>
    kohya = {("lora_" + k if k.startswith("transformer_") else k): v for k, v in kohya.items()}
    if alpha is not None:
        for k in kohya:
            if k.endswith(".alpha"):
                kohya[k] = torch.tensor(float(alpha))
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(tmp), metadata={"ss_network_module": "networks.lora",
                                                                                 "visalign_source": str(src)})
    tmp.replace(out)
    return out


def kohya_to_diffusers(kohya: dict, module_names: list[str], prefix: str = "transformer") -> dict:
    """``lora_<prefix>_*`` Kohya keys back to diffusers/peft keys (``<prefix>.<module>.lora_A/B.weight``), the
    trained alpha folded into B (diffusers loads a file without adapter metadata at alpha = rank)."""
    by_flat = {name.replace(".", "_"): name for name in module_names}
    out = {}
    for key, value in kohya.items():
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        module = by_flat[stem[len(f"lora_{prefix}_"):]]
        down, up = value, kohya[f"{stem}.lora_up.weight"]
        scale = float(kohya[f"{stem}.alpha"]) / down.shape[0] if f"{stem}.alpha" in kohya else 1.0
        out[f"{prefix}.{module}.lora_A.weight"] = down
        out[f"{prefix}.{module}.lora_B.weight"] = up * scale
    return out
