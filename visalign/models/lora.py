"""LoRA through peft on a backbone's denoiser, saved in diffusers format (``pipe.load_lora_weights``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


def add_twin_adapter(backbone, name: str) -> list[torch.nn.Parameter]:
    """A second LoRA adapter ``name`` on the denoiser, with the first's config and weights (two identical
    modules, OFS-DPO's fast and slow ones); 'default' stays active (it is sampled, saved and the policy), the
    twin runs inside ``using_adapter(backbone, name)``. Returns the twin's trainable parameters."""
    from peft import inject_adapter_in_model

    model = backbone.unwrapped()
    if not backbone.uses_lora:
        raise ValueError("a twin adapter needs a LoRA run (lora.enabled=true)")
    inject_adapter_in_model(backbone.lora_config, model, adapter_name=name)
    if isinstance(getattr(model, "peft_config", None), dict):
        model.peft_config[name] = backbone.lora_config
    params = dict(model.named_parameters())
    twin = {n: p for n, p in params.items() if f".{name}." in n}
    with torch.no_grad():
        for n, p in twin.items():
            p.data = params[n.replace(f".{name}.", ".default.")].detach().float().clone()
    _activate(model, "default")
    for n, p in params.items():  # both modules train (peft's injection may have frozen one)
        p.requires_grad_(f".{name}." in n or ".default." in n)
    return list(twin.values())


def _activate(model: torch.nn.Module, name: str) -> None:
    """Make adapter ``name`` the one each LoRA layer runs (peft's switch, which trains only the active one,
    with the training flags kept: both modules learn, each through its own forward in the same step)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            _keeping_flags(module, lambda m: m.set_adapter(name))


def _keeping_flags(layer, switch) -> None:
    """Run a peft switch on a LoRA layer and put its adapters' requires_grad back as it was: peft's switches
    freeze every adapter but the active one, which would silently stop a second module from learning."""
    params = [p for n in layer.adapter_layer_names for sub in getattr(layer, n).values() for p in sub.parameters()]
    flags = [p.requires_grad for p in params]
    switch(layer)
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)


@contextlib.contextmanager
def using_adapter(backbone, name: str) -> Iterator[None]:
    """Inside this context the denoiser runs LoRA adapter ``name`` instead of 'default'."""
    model = backbone.unwrapped()
    _activate(model, name)
    try:
        yield
    finally:
        _activate(model, "default")


CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def add_text_encoder_lora(backbone, spec: LoraSpec) -> list[torch.nn.Parameter]:
    """A LoRA on each CLIP text encoder the family's LoRA files carry (``text_encoder``, ``text_encoder_2``);
    returns its trainable parameters. Refused, naming the family, where its LoRA format has no text part."""
    import inspect

    import diffusers
    from peft import LoraConfig, inject_adapter_in_model

    from ..errors import UserError

    writer = getattr(diffusers, backbone.lora_pipeline)
    encoders = backbone.text_encoders_for_lora()
    accepted = inspect.signature(writer.save_lora_weights).parameters
    if not encoders or any(f"{name}_lora_layers" not in accepted for name in encoders):
        raise UserError(f"lora.text_encoder=true: the {backbone.family} family's LoRA files ({backbone.lora_pipeline})"
                        " have no text-encoder part; train the denoiser's LoRA only")
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, init_lora_weights=True,
                     target_modules=list(spec.targets), use_dora=spec.use_dora)
    params = []
    for encoder in encoders.values():
        encoder.requires_grad_(False)
        inject_adapter_in_model(cfg, encoder, adapter_name="default")  # B = 0: the encoder starts unchanged
        encoder.peft_config = {"default": cfg}
        for p in encoder.parameters():
            if p.requires_grad:
                p.data = p.data.float()
                params.append(p)
    backbone.text_lora, backbone.text_lora_config = True, cfg
    return params


def text_lora_layers(backbone) -> dict[str, dict[str, torch.Tensor]]:
    """{encoder name: its LoRA weights in diffusers' naming} (empty without a text-encoder LoRA)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if not getattr(backbone, "text_lora", False):
        return {}
    return {name: {k: v.detach().cpu().contiguous()
                   for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(enc)).items()}
            for name, enc in backbone.text_encoders_for_lora().items()}


def text_lora_weights(backbone) -> dict[str, torch.Tensor] | None:
    """The text-encoder LoRA's weights for a checkpoint ({encoder}.{peft key} -> tensor); None without one."""
    from peft.utils import get_peft_model_state_dict

    if not getattr(backbone, "text_lora", False):
        return None
    return {f"{name}.{k}": v.detach().cpu().contiguous()
            for name, enc in backbone.text_encoders_for_lora().items()
            for k, v in get_peft_model_state_dict(enc).items()}


def restore_text_lora(backbone, weights: dict[str, torch.Tensor]) -> None:
    """Put back text-encoder LoRA weights saved by a checkpoint ({encoder}.{peft key} -> tensor)."""
    from peft.utils import set_peft_model_state_dict

    for name, enc in backbone.text_encoders_for_lora().items():
        own = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}
        set_peft_model_state_dict(enc, own)


def set_adapters_enabled(model: torch.nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer of ``model`` on or off (the reference is 'adapters off'): peft's own switch on
    each layer, as diffusers' ``disable_adapters`` does, for any model (transformers' needs a newer peft)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            _keeping_flags(module, lambda m: m.enable_adapters(enabled))


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
    text = {f"{name}_lora_layers": state for name, state in text_lora_layers(backbone).items()}
    text |= {f"{name}_lora_adapter_metadata": backbone.text_lora_config.to_dict()
             for name in text_lora_layers(backbone)}
    writer.save_lora_weights(out_dir, safe_serialization=True, **{
        f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": backbone.lora_config.to_dict()}, **text)
    return out_dir / "pytorch_lora_weights.safetensors"


def load_lora(backbone, lora_dir: str | Path) -> None:
    """Load a diffusers-format LoRA (as written by ``save_lora``) onto the backbone's denoiser."""
    prefix = backbone.lora_prefix
    path = Path(lora_dir)
    file = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
    read_lora_file(file)  # a missing, truncated or non-LoRA file is one error naming it
    model = backbone.unwrapped()
    try:
        if hasattr(model, "load_lora_adapter"):
            model.load_lora_adapter(str(file.parent), weight_name=file.name, prefix=prefix, adapter_name="default")
        else:
            inject_saved_lora(model, file, prefix)
        _load_text_parts(backbone, file)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"--lora {file}: does not fit this {backbone.family} model ({first_line(e)})") from None
    backbone.uses_lora = True


def _load_text_parts(backbone, file: Path) -> None:
    """A LoRA file's text-encoder parts (``text_encoder.*``, ``text_encoder_2.*``) onto the backbone's
    encoders, with the family's own diffusers loader (so sampling sees what training trained)."""
    import json

    import diffusers

    state, meta = read_lora_file(file)
    saved = next((json.loads(v) for k, v in meta.items() if k.endswith("lora_adapter_metadata")), {})
    loader = getattr(diffusers, backbone.lora_pipeline)
    for name, enc in backbone.text_encoders_for_lora().items():
        if any(k.startswith(name + ".") for k in state):
            config = {k: v for k, v in saved.items() if k.startswith(name + ".")} or None  # diffusers strips it
            loader.load_lora_into_text_encoder(state, network_alphas=None, text_encoder=enc, prefix=name,
                                               metadata=config)
            backbone.text_lora = True


def inject_saved_lora(model: torch.nn.Module, file: Path, prefix: str) -> None:
    """A diffusers-format LoRA file onto a model without diffusers' loader (PixArt), with plain peft: the
    config from the file's adapter metadata (else rank from the shapes, alpha = rank), then the weights."""
    import json

    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

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
