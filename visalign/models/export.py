"""LoRA export for other tools: Kohya-style safetensors (ComfyUI, A1111/Forge, SD.Next, InvokeAI)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def export_kohya(lora_dir: str | Path, out_file: str | Path) -> Path:
    """Convert a visalign/diffusers LoRA to Kohya keys (``lora_unet_*.lora_down/up.weight`` + ``.alpha``).

    The alpha tensors carry the trained ``lora_alpha`` (diffusers' converter writes alpha = rank,
    which silently rescales an adapter trained with alpha ≠ rank).
    """
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = Path(lora_dir)
    src = src / "pytorch_lora_weights.safetensors" if src.is_dir() else src
    if not src.exists():
        raise FileNotFoundError(f"no LoRA weights at {src}")
    with safe_open(str(src), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    alpha = None
    for key, value in meta.items():
        if key.endswith("lora_adapter_metadata"):  # keys are prefixed: "unet.lora_alpha"
            alpha = next((v for k, v in json.loads(value).items() if k.split(".")[-1] == "lora_alpha"), None)
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(state))
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
