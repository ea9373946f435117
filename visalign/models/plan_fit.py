"""The planner's activation model (plan.py's A(T, n)): measured training steps of real width at small sizes,
a least-squares fit, and its cache (one fit per architecture)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .lora import DEFAULT_TARGETS
from .plan import build_denoiser, dtype_name, image_tokens


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
    gradient). An fp32 fit also measures one bf16 step against its own largest one (``half_check``): the ratio
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

    def coefficients(**depth) -> tuple[Coefficients, Coefficients, int]:
        """(per sample, fixed, the largest size's batch-3 peak): the step's peaks at batches 2 and 3 split
        into n·S(T) + F(T) (not batch 1: CPU kernels take other paths for a single sample, a step in its peak)."""
        model = trained(dtype, **depth)
        ts, per_sample, fixed, threes = [], [], [], []
        for res in resolutions:
            two, three = (peak(model, res, n, dtype) for n in (2, 3))
            ts.append(image_tokens(config, res))
            per_sample.append(three - two)
            fixed.append(two - 2 * (three - two))
            threes.append(three)
        del model
        return fit(ts, per_sample), fit(ts, fixed), threes[resolutions.index(max(resolutions))]

    def difference(a: Coefficients, b: Coefficients) -> Coefficients:
        return tuple(y - x for x, y in zip(a, b))

    ones = {k: 1 for k in keys}
    base, fixed, largest = coefficients(**ones)
    per_block, fixed_per_block = {}, {}
    for k in keys:
        two, two_fixed, _ = coefficients(**(ones | {k: 2}))
        per_block[k], fixed_per_block[k] = difference(base, two), difference(fixed, two_fixed)
    half_ratio = 0.0
    if dtype == torch.float32 and half_check:  # one bf16 step beside the fit's own, at the largest size
        half_ratio = peak(trained(torch.bfloat16, **ones), max(resolutions), 3, torch.bfloat16) / largest
    return ActivationModel(base, per_block, fixed, fixed_per_block, torch.empty(0, dtype=dtype).element_size(),
                           half_ratio)


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
    steps += 2 if dtype == torch.float32 else 0  # the bf16/fp32 ratio's bf16 step, with and without checkpointing
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
