"""Will it fit? A memory plan for a run, made without its weights (``visalign plan``).

From the family's published denoiser configuration (its config.json: the local folder's, or the small copy
shipped in models/published/) the planner builds the denoiser on the meta device, so parameter counts,
LoRA sizes and dtypes are exact. Activations come from a measured scaling model:

    A(T, n) = n·S(T) + F(T),  S, F = γ + α·T + β·T²   bytes, T = image tokens (latent side² / patch²), n samples

fitted (plan_fit.py) by least squares on training steps of the *same architecture* at four small sizes and batches of 2
and 3 (F: what does not grow with the batch; random weights, real width; a DiT at one block per depth
key, its other blocks added by the measured per-block cost). What
is measured is the step's peak of live tensors above the weights (PyTorch's memory-profiler timeline of
every allocation and free, forward and backward, less the trainable gradients the plan counts apart): the
saved activations and, under gradient checkpointing, the blocks' inputs, one block's recomputation and the
backward's transients, which autograd's saved tensors alone do not show. γ is the text tokens' share, T²
the attention scores a math-kernel attention keeps. Every number is an estimate until a GPU has measured
the same run (scripts/gpu_check.py).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .lora import DEFAULT_TARGETS

if TYPE_CHECKING:
    from .plan_fit import ActivationModel

PUBLISHED = Path(__file__).with_name("published")
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "fp8": 1.0, "nf4": 0.53}  # nf4: + its scales
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "dct_adamw": 2.0}  # states per trainable parameter
CUDA_CONTEXT = 0.6 * 2**30  # the CUDA context and cuBLAS workspaces before any tensor
FRAGMENTATION = 1.10  # the caching allocator's slack over live tensors
SIZES_GB = (24, 48, 80)


def published_config(family: str, path: str | None = None) -> dict:
    """The denoiser's config.json: the local folder's own (unet/ or transformer/), with the shipped copy's
    planner fields (``_vae_factor``, ``_text_tokens``, ...), or the shipped copy alone."""
    shipped = PUBLISHED / f"{family}.json"
    if not shipped.exists():
        from ..errors import UserError

        known = ", ".join(sorted(p.stem for p in PUBLISHED.glob("*.json")))
        raise UserError(f"plan: no published configuration for model.name={family!r}; planned families: {known}")
    config = json.loads(shipped.read_text())
    for sub in ("unet", "transformer"):
        local = Path(path or "") / sub / "config.json"
        if path and local.exists():
            config |= {k: v for k, v in json.loads(local.read_text()).items() if not k.startswith("_")}
    return config


def build_denoiser(config: dict, empty: bool = True, dtype: torch.dtype = torch.float32, **overrides):
    """The denoiser class of ``config`` built from it (on the meta device when ``empty``)."""
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, config["_class_name"])
    arch = {k: v for k, v in config.items() if not k.startswith("_")} | overrides
    if empty:
        with init_empty_weights():
            return cls.from_config(arch)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random init straight in ``dtype``: a real-width model never whole in fp32
    try:
        return cls.from_config(arch).to(dtype)
    finally:
        torch.set_default_dtype(previous)


def lora_parameters(model: torch.nn.Module, targets: tuple[str, ...], rank: int) -> int:
    """LoRA's trainable count on ``model``: r·(in + out) for each Linear whose name ends in a target."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")


def image_tokens(config: dict, resolution: int) -> int:
    side = resolution // config["_vae_factor"]
    # a model that patchifies the latent itself (SD3, PixArt) sees (side / p)²; FLUX and Qwen-Image arrive
    # packed (their _vae_factor counts the 2x2 packing), UNets and Sana (p = 1) see every latent pixel
    return (side // config.get("patch_size", 1)) ** 2 if config.get("_patchifies") else side**2


@dataclass
class RunShape:
    """What of a run sets its memory (read from its config by ``visalign plan``)."""

    family: str
    path: str | None = None
    resolution: int | None = None
    batch: int = 1
    images_per_sample: int = 2  # pairs: the winner and the loser; lists: the list; online: 1 per trajectory
    lora_rank: int = 8  # 0: full fine-tuning
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    quantize: str = "none"
    checkpointing: bool = False
    optimizer: str = "adamw"
    compute: str = "bf16"  # the activations' dtype (train.mixed_precision)
    weights: str = "fp32"  # the frozen base as the loop loads it (its folder's dtype, fp32) unless quantized
    cache_complete: bool = False
    rollouts: int = 0  # online: trajectories kept per round
    rollout_steps: int = 0


def default_resolution(shape: RunShape, config: dict) -> int:
    """The run's side in pixels: model.resolution, else the family's default (its config's sample size)."""
    return shape.resolution or int(config.get("_resolution") or config.get("sample_size", 128) * config["_vae_factor"])


@functools.lru_cache(maxsize=32)
def _counts(config_json: str, targets: tuple[str, ...], rank: int) -> tuple[int, int, int]:
    """(parameters, Linear weights, LoRA parameters) of the denoiser a config builds, on the meta device,
    once per config: ``advice`` plans a run many times over."""
    model = build_denoiser(json.loads(config_json))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return sum(p.numel() for p in model.parameters()), linear, lora_parameters(model, targets, rank)


def plan_parts(shape: RunShape, config: dict, free: ActivationModel, ckpt: ActivationModel) -> dict[str, float]:
    """Bytes by part: weights, trainable, gradients, optimizer, activations, rollouts, encoders, overhead."""
    depth = {k: int(config[k]) for k in config.get("_depth_keys", [])}
    total, linear, lora = _counts(json.dumps(config, sort_keys=True), tuple(shape.lora_targets), shape.lora_rank)
    cb, held = DTYPE_BYTES[shape.compute], DTYPE_BYTES[shape.weights]
    wb = DTYPE_BYTES[shape.quantize] if shape.quantize != "none" else held  # quantized: the Linear weights
    trainable = lora if shape.lora_rank else total
    resolution = default_resolution(shape, config)
    tokens = image_tokens(config, resolution)
    samples = shape.batch * shape.images_per_sample
    fitted = ckpt if shape.checkpointing else free
    activations = fitted.bytes(tokens, depth, samples) * fitted.scale_to(cb)
    latent = 4 * resolution**2 / config["_vae_factor"] ** 2 * config.get("in_channels", 4)
    parts = {
        "weights (denoiser)": linear * wb + (total - linear) * held,
        "reference copy": 0.0 if shape.lora_rank else total * held,  # LoRA's reference is adapters off
        "trainable (fp32)": trainable * 4.0,
        "gradients": trainable * 4.0,
        "optimizer states": trainable * OPTIMIZER_BYTES[shape.optimizer],
        # the measured step peak: with checkpointing it holds the block inputs and one block's recomputation
        "activations": activations,
        "rollouts kept": shape.rollouts * (shape.rollout_steps + 1) * latent,
        "text encoders + VAE": 0.0 if shape.cache_complete else
        (config.get("_encoder_params", 0) + config.get("_vae_params", 0)) * held,
    }
    parts["allocator slack + CUDA context"] = sum(parts.values()) * (FRAGMENTATION - 1) + CUDA_CONTEXT
    return parts


OPTIONS = [  # cheapest first: what each costs beyond memory
    ("data.cache=true (encode once, then train without the text encoders and VAE)", {"cache_complete": True}),
    ("train.optimizer=adamw8bit", {"optimizer": "adamw8bit"}),
    ("train.gradient_checkpointing=true (~30% slower steps)", {"checkpointing": True}),
    ("model.quantize=int8", {"quantize": "int8"}),
    ("model.quantize=nf4 (CUDA)", {"quantize": "nf4"}),
    ("train.batch_size=1 with train.grad_accum", {"batch": 1}),
]


def advice(shape: RunShape, config: dict, free: ActivationModel, ckpt: ActivationModel, size_gb: int) -> list[str]:
    """The options, cheapest first, that together bring the run under ``size_gb`` (empty: fits already, or
    nothing here is enough)."""
    import dataclasses

    def fits(options: list[tuple[str, dict]]) -> bool:
        current = shape
        for _, change in options:
            current = dataclasses.replace(current, **change)
        return sum(plan_parts(current, config, free, ckpt).values()) <= size_gb * 2**30

    taken: list[tuple[str, dict]] = []
    for option in OPTIONS:  # add the cheapest options until the run fits ...
        if fits(taken):
            break
        if not all(getattr(shape, k) == v for k, v in option[1].items()):
            taken.append(option)
    if not fits(taken):
        return []
    for option in list(taken):  # ... then drop each that the others make unnecessary
        if fits([o for o in taken if o is not option]):
            taken.remove(option)
    return [text for text, _ in taken]


def format_plan(shape: RunShape, config: dict, parts: dict[str, float], tips: dict[int, list[str]]) -> str:
    gib = 2**30
    total = sum(parts.values())
    res = default_resolution(shape, config)
    lines = [f"memory plan (an estimate until a GPU measures it): {shape.family} at {res}px, batch {shape.batch} x "
             f"{shape.images_per_sample} image(s), {'LoRA r' + str(shape.lora_rank) if shape.lora_rank else 'full'}"
             f", weights {shape.quantize if shape.quantize != 'none' else shape.weights},"
             f" checkpointing {'on' if shape.checkpointing else 'off'}, "
             f"{shape.optimizer}, activations in {shape.compute}", ""]
    lines += [f"  {name:<34} {value / gib:8.2f} GiB" for name, value in parts.items()]
    lines += [f"  {'total':<34} {total / gib:8.2f} GiB", ""]
    for size in SIZES_GB:
        if total <= size * gib:
            lines.append(f"  {size} GB: fits")
        elif tips.get(size):
            lines.append(f"  {size} GB: does not fit; it would with " + ", ".join(tips[size]))
        else:
            lines.append(f"  {size} GB: does not fit, even with every option here")
    return "\n".join(lines)
