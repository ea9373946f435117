"""Will it fit? A memory plan for a run, made without its weights (``visalign plan``).

From the family's published denoiser configuration (its config.json: the local folder's, or the small copy
shipped in models/published/) the planner builds the denoiser on the meta device, so parameter counts,
LoRA sizes and dtypes are exact. Activations come from a measured scaling model:

    A(T, n) = n·S(T) + F(T),  S, F = γ + α·T + β·T²   bytes, T = image tokens (latent side² / patch²), n samples

fitted by least squares on training steps of the *same architecture* at four small sizes and batches of 2
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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .lora import DEFAULT_TARGETS

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


def tensor_bytes(*things) -> int:
    """Bytes of the tensors in modules (parameters, buffers; a quantized weight's data and scales) and in dicts
    or tensors, each storage once."""
    seen, total = set(), 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        for part in [getattr(t, n) for n in ("_data", "_scale") if hasattr(t, n)] or [t]:
            storage = part.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()

    def walk(thing) -> None:
        if isinstance(thing, torch.nn.Module):
            thing = thing.state_dict(keep_vars=True)
        if isinstance(thing, dict):  # inputs nest (SDXL's added_cond_kwargs)
            for v in thing.values():
                walk(v)
        elif torch.is_tensor(thing):
            add(thing)

    for thing in things:
        walk(thing)
    return total


def peak_tensor_bytes(fn, alive: int = 0) -> int:
    """The peak of live tensor bytes ``fn`` adds above those alive before it (PyTorch's memory-profiler
    timeline of every allocation and free, the backward's included): on CPU the analogue of
    torch.cuda.max_memory_allocated, which the resident set is not (the heap keeps freed pages). The
    timeline enters a tensor made before ``fn`` at its first use, not at its start, so ``alive`` (the bytes of
    the weights and inputs ``fn`` uses, ``tensor_bytes``) is taken off: the peak, in the backward, comes after
    every one has been used. The planner's own check (tests/test_plan.py, scripts/realwidth_check.py)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        fn()
    times, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline("cpu")
    return max((sum(s) for s in sizes), default=0) - alive


def step_peak_bytes(model: torch.nn.Module, inputs: dict) -> int:
    """Peak live bytes one training forward + backward adds, less the trainable parameters' gradients (the
    plan counts those as a part of their own): saved activations, checkpointed blocks' inputs and their
    recomputation, the backward's transients. Measured, not modelled: autograd's saved tensors alone miss the
    last three (FLUX.1 under checkpointing: half its peak, docs/results.md)."""
    def step():
        out = model(**inputs)
        (out[0] if isinstance(out, tuple) else out.sample).float().pow(2).mean().backward()

    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    peak = peak_tensor_bytes(step, alive=tensor_bytes(model, inputs))
    model.zero_grad(set_to_none=True)
    return peak - grads


def with_lora(model: torch.nn.Module, rank: int = 4, targets: tuple[str, ...] = DEFAULT_TARGETS) -> torch.nn.Module:
    """``model`` frozen with peft LoRA adapters on ``targets``, kept in fp32 as the loop keeps them (their inputs
    are then saved in fp32); peft's injection works on any module, PeftAdapterMixin or not (PixArt)."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)), model)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def image_tokens(config: dict, resolution: int) -> int:
    side = resolution // config["_vae_factor"]
    # a model that patchifies the latent itself (SD3, PixArt) sees (side / p)²; FLUX and Qwen-Image arrive
    # packed (their _vae_factor counts the 2x2 packing), UNets and Sana (p = 1) see every latent pixel
    return (side // config.get("patch_size", 1)) ** 2 if config.get("_patchifies") else side**2


def fit(ts: list[float], ys: list[float]) -> tuple[float, float, float]:
    """(γ, α, β) of y = γ + α·T + β·T², least squares (T scaled to 1 for conditioning)."""
    scale = max(ts)
    a = torch.tensor([[1.0, t / scale, (t / scale) ** 2] for t in ts], dtype=torch.float64)
    sol = torch.linalg.lstsq(a, torch.tensor(ys, dtype=torch.float64)[:, None]).solution[:, 0]
    return float(sol[0]), float(sol[1]) / scale, float(sol[2]) / scale**2


Coefficients = tuple[float, float, float]


@dataclass
class ActivationModel:
    """Activation bytes at T image tokens for n samples: n x a per-sample curve plus a curve that does not grow
    with the batch (one block's recomputation buffers, the loss's scalars), each the base (one block per
    depth key) plus, per depth key, the measured cost of each further block."""

    base: Coefficients
    per_block: dict[str, Coefficients] = field(default_factory=dict)
    fixed: Coefficients = (0.0, 0.0, 0.0)
    fixed_per_block: dict[str, Coefficients] = field(default_factory=dict)
    measured_bytes: float = 2.0  # bytes per element of the dtype the steps ran in (bf16; fp32 where it is emulated)
    # an fp32 fit's measured bf16/fp32 ratio of one step's activations (0: none measured). Not 0.5: the loss,
    # norms and softmax keep fp32 tensors in a bf16 step (tiny FLUX: 0.76-0.83, docs/results.md)
    half_ratio: float = 0.0

    def scale_to(self, compute_bytes: float) -> float:
        """The factor from the fit's dtype to a run's ``compute_bytes`` per element: the measured ratio for an
        fp32 fit planning a half-precision run, else the dtypes' bytes."""
        if compute_bytes == self.measured_bytes:
            return 1.0
        if self.half_ratio and self.measured_bytes == 4.0 and compute_bytes == 2.0:
            return self.half_ratio
        return compute_bytes / self.measured_bytes

    @staticmethod
    def _at(c: Coefficients, tokens: int) -> float:
        return c[0] + c[1] * tokens + c[2] * tokens**2

    def _curve(self, base: Coefficients, per_block: dict, tokens: int, depth: dict[str, int]) -> float:
        return self._at(base, tokens) + sum((depth[k] - 1) * self._at(c, tokens) for k, c in per_block.items())

    def bytes(self, tokens: int, depth: dict[str, int], samples: int = 1) -> float:
        return (samples * self._curve(self.base, self.per_block, tokens, depth)
                + self._curve(self.fixed, self.fixed_per_block, tokens, depth))

    def to_json(self) -> dict:
        return {"base": self.base, "per_block": self.per_block, "fixed": self.fixed,
                "fixed_per_block": self.fixed_per_block, "measured_bytes": self.measured_bytes,
                "half_ratio": self.half_ratio}

    @classmethod
    def from_json(cls, m: dict) -> ActivationModel:
        blocks = lambda d: {k: tuple(v) for k, v in d.items()}  # noqa: E731
        return cls(tuple(m["base"]), blocks(m["per_block"]), tuple(m.get("fixed", (0.0, 0.0, 0.0))),
                   blocks(m.get("fixed_per_block", {})), float(m.get("measured_bytes", 2.0)),
                   float(m.get("half_ratio", 0.0)))


def measure_activations(config: dict, resolutions: tuple[int, ...], dtype=torch.bfloat16, tokens: int | None = None,
                        checkpointing: bool = False, lora: bool = True, half_check: bool = True) -> ActivationModel:
    """Fit the activation model on the measured peak of real-width training steps (``step_peak_bytes``) at
    ``resolutions`` (small sizes of the same family), trained as the run trains it: a frozen base with LoRA
    adapters holds less than full fine-tuning (a frozen Linear needs no copy of its input for a weight
    gradient). An fp32 fit also measures one bf16 step against one fp32 step (``half_check``): the ratio
    a bf16 run's plan uses (``ActivationModel.half_ratio``)."""
    from .plan_inputs import INPUTS

    text = tokens or config["_text_tokens"]
    keys = config.get("_depth_keys", [])

    def trained(step_dtype: torch.dtype, **depth) -> torch.nn.Module:
        model = build_denoiser(config, empty=False, dtype=step_dtype, **depth).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        if lora:
            with_lora(model)
        else:
            model.requires_grad_(True)
        return model

    def peak(model: torch.nn.Module, res: int, n: int, step_dtype: torch.dtype) -> int:
        return step_peak_bytes(model, INPUTS[config["_class_name"]](config, res, n, text, step_dtype))

    def coefficients(**depth) -> tuple[Coefficients, Coefficients]:
        """(per sample, fixed): the step's peaks at batches 2 and 3 split into n·S(T) + F(T) (not batch 1:
        CPU kernels take other paths for a single sample, a step in its peak)."""
        model = trained(dtype, **depth)
        ts, per_sample, fixed = [], [], []
        for res in resolutions:
            two, three = (peak(model, res, n, dtype) for n in (2, 3))
            ts.append(image_tokens(config, res))
            per_sample.append(three - two)
            fixed.append(two - 2 * (three - two))
        del model
        return fit(ts, per_sample), fit(ts, fixed)

    def difference(a: Coefficients, b: Coefficients) -> Coefficients:
        return tuple(y - x for x, y in zip(a, b))

    ones = {k: 1 for k in keys}
    base, fixed = coefficients(**ones)
    per_block, fixed_per_block = {}, {}
    for k in keys:
        two, two_fixed = coefficients(**(ones | {k: 2}))
        per_block[k], fixed_per_block[k] = difference(base, two), difference(fixed, two_fixed)
    half_ratio = 0.0
    if dtype == torch.float32 and half_check:  # one bf16 step beside one fp32 step, at the largest fitted size
        res = max(resolutions)
        half_ratio = peak(trained(torch.bfloat16, **ones), res, 3, torch.bfloat16) / peak(
            trained(torch.float32, **ones), res, 3, torch.float32)
    return ActivationModel(base, per_block, fixed, fixed_per_block, torch.empty(0, dtype=dtype).element_size(),
                           half_ratio)


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


MEASURED_SIDES = (8, 16, 24, 32)  # latent sides the activation model is fitted on


def activation_models(config: dict, family: str, cache: Path, lora: bool = True,
                      dtype: torch.dtype | None = None) -> tuple[ActivationModel, ActivationModel]:
    """(without, with gradient checkpointing): fitted once per architecture, then read from ``cache`` (the
    caller's folder; the CLI's is the data cache's ``plan/``). ``dtype``: the fit's steps' (default: bf16,
    fp32 where the CPU emulates bf16)."""
    import hashlib
    import os

    from .load import bf16_is_emulated

    # the steps run in bf16, as the run trains; where a CPU emulates bf16 (no AVX512-BF16 or AMX: 20x slower
    # there) in fp32, and a bf16 plan scales them by one measured bf16/fp32 step ratio (not the bytes' 0.5)
    if dtype is None:
        dtype = torch.float32 if bf16_is_emulated("cpu") else torch.bfloat16
    arch = json.dumps({k: v for k, v in config.items() if k != "_source"}, sort_keys=True)
    # fitted on measured step peaks (earlier caches: saved tensors), keyed by the steps' dtype
    kind = ("lora" if lora else "full") + "-peak" + ("-fp32" if dtype == torch.float32 else "")
    path = cache / f"{family}-{kind}-{hashlib.sha256(arch.encode()).hexdigest()[:16]}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        return tuple(ActivationModel.from_json(m) for m in saved)
    resolutions = tuple(s * config["_vae_factor"] for s in MEASURED_SIDES)
    steps = 2 * 2 * len(resolutions) * (1 + len(config.get("_depth_keys", [])))
    steps += 4 if dtype == torch.float32 else 0  # the bf16/fp32 ratio's two steps, with and without checkpointing
    # the first plan of an architecture trains real-width steps (a 12B family: about 10 minutes on 2 CPU cores)
    print(f"plan: fitting {family}'s activation model on this machine ({steps} profiled {dtype_name(dtype)} training"
          f" steps at "
          f"latent sides {', '.join(map(str, MEASURED_SIDES))}; once per architecture, cached in {path.parent})",
          file=sys.stderr, flush=True)
    start = time.monotonic()
    models = (measure_activations(config, resolutions, dtype, lora=lora),
              measure_activations(config, resolutions, dtype, checkpointing=True, lora=lora))
    print(f"plan: fitted in {(time.monotonic() - start) / 60:.1f} min", file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two first plans at once each write their own, then rename
    tmp.write_text(json.dumps([m.to_json() for m in models]))
    tmp.replace(path)
    return models


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
