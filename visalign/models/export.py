"""LoRA export for other tools: Kohya-style safetensors (ComfyUI, A1111/Forge, SD.Next, InvokeAI)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError, UserError, first_line  # noqa: F401
from .lora import read_lora_file  # noqa: F401  (re-exported: where readers looked for it)


def lora_family(src: Path, state: dict) -> str | None:
    """The model family a LoRA was trained on: its run's config.yaml (``RUN/lora`` -> ``RUN/config.yaml``),
    else its keys (only FLUX has ``single_transformer_blocks``); None when nothing says."""
    import yaml

    run_config = (src.parent if src.is_file() else src).parent / "config.yaml"
    if run_config.is_file():
        name = ((yaml.safe_load(run_config.read_text()) or {}).get("model") or {}).get("name")
        if name:
            return str(name)
    return "flux" if any(".single_transformer_blocks." in k for k in state) else None


def _adapter_alphas(meta: dict) -> dict[str, float]:
    """Each part's trained lora_alpha from the adapter metadata: {"unet": 8.0, "text_encoder": 4.0, ...}."""
    for key, value in meta.items():
        if key.endswith("lora_adapter_metadata"):  # keys are prefixed: "unet.lora_alpha"
            return {k.rsplit(".", 1)[0]: float(v) for k, v in json.loads(value).items() if k.endswith(".lora_alpha")}
    return {}


# the Kohya key prefix of each part of a diffusers LoRA file
KOHYA_PARTS = {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_unet_": "unet",
               "lora_transformer_": "transformer"}


def export_kohya(lora_dir: str | Path, out_file: str | Path, family: str | None = None) -> Path:
    """Convert a visalign/diffusers LoRA to Kohya keys (``lora_unet_*.lora_down/up.weight`` + ``.alpha``).

    SD 1.x and SDXL get ``lora_unet_*`` (read by diffusers, ComfyUI and A1111); an SD3 transformer LoRA gets
    ``lora_transformer_*``, the naming ComfyUI maps for SD3 (``comfy/lora.py``, OneTrainer's format), which
    diffusers' own SD3 loader does not read: ``kohya_to_diffusers`` turns it back. A FLUX LoRA gets
    sd-scripts' ``lora_unet_double_blocks_*`` / ``single_blocks_*`` names with fused q/k/v (``flux_kohya``),
    which ComfyUI and diffusers' FLUX loader read. ``family`` defaults to what ``lora_family`` finds.

    The alpha tensors carry the trained ``lora_alpha`` (diffusers' converter writes alpha = rank,
    which silently rescales an adapter trained with alpha ≠ rank).
    """
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import save_file

    from ..files import refuse_output_over_input

    src = Path(lora_dir)
    src = src / "pytorch_lora_weights.safetensors" if src.is_dir() else src
    refuse_output_over_input(out_file, {"LORA": src}, "--out")
    if Path(out_file).is_dir():
        raise UserError(f"--out {out_file}: is a folder; pass the .safetensors file to write")
    state, meta = read_lora_file(src)
    alphas = _adapter_alphas(meta)
    if (family or lora_family(src, state)) == "flux":
        from .flux import flux_kohya

        text = {k: v for k, v in state.items() if k.startswith("text_encoder")}  # CLIP: lora_te1_* as ever
        peft = convert_all_state_dict_to_peft({k: v for k, v in state.items() if k not in text})
        kohya = flux_kohya(_adapters(peft, "transformer"), alphas.get("transformer", _rank(peft)))
        kohya |= convert_state_dict_to_kohya(convert_all_state_dict_to_peft(_with_text_model(text))) if text else {}
    else:
        kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(state))
        # a transformer (SD3) LoRA: ComfyUI's OneTrainer-style keys, lora_transformer_<module path with _>
        kohya = {("lora_" + k if k.startswith("transformer_") else k): v for k, v in kohya.items()}
        for k in kohya:
            part = next((p for prefix, p in KOHYA_PARTS.items() if k.startswith(prefix)), None)
            if k.endswith(".alpha") and part in alphas:
                kohya[k] = torch.tensor(alphas[part])
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(tmp), metadata={"ss_network_module": "networks.lora",
                                                                                 "visalign_source": str(src)})
    tmp.replace(out)
    return out


def _adapters(state: dict, prefix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{prefix}.{module}.lora_A/B.weight`` -> {module: (A, B)}."""
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight") and key.startswith(prefix + "."):
            module = key[len(prefix) + 1: -len(".lora_A.weight")]
            out[module] = (a, state[key.replace(".lora_A.", ".lora_B.")])
    if len(out) * 2 != len(state):
        odd = sorted(k for k in state if not k.startswith(prefix + ".") or ".lora_" not in k)
        raise CheckpointError(f"LoRA keys outside {prefix}.*.lora_A/B: {', '.join(odd[:3])}")
    return out


def _with_text_model(text: dict) -> dict:
    """``text_encoder.encoder.*`` -> ``text_encoder.text_model.encoder.*``: Kohya's CLIP names
    (``lora_te1_text_model_encoder_layers_*``) keep the module path CLIPTextModel has."""
    out = {}
    for key, value in text.items():
        prefix, rest = key.split(".", 1)
        out[f"{prefix}.{rest if rest.startswith('text_model.') else 'text_model.' + rest}"] = value
    return out


def _rank(state: dict) -> int:
    return next(v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight"))


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
