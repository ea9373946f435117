"""GPU check (one command, <= 8 minutes): real-size SDXL UNet, SD3-medium and FLUX.1-dev transformers, random init.

    bash scripts/gpu_check.sh            # writes gpu_check.json
    python scripts/gpu_check.py --device cpu --size tiny --steps 1 --out /tmp/check.json  # same code path, tiny

visalign's own LoRA Diffusion-DPO steps (the family's backbone class, `add_lora`, `diffusion_dpo`) in bf16
with gradient checkpointing: step time and peak memory, with PyTorch
SDPA and (when it loads) xformers. SDXL at 1024x1024 (latents 128x128); SD3-medium at 1024 (latents 128);
FLUX.1-dev (12 B, weights in bf16) at 1024 (4,096 packed tokens + 512 T5 tokens, guidance input), which
also times one GRPO update: the clipped ratio of the Flow-GRPO SDE step over a group of 4 rollouts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from visalign.types import PreferenceBatch

# the real architectures, and tiny ones with the same structure for a CPU run of the same code path
SDXL = {
    "real": dict(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
    "tiny": dict(sample_size=16, layers_per_block=1, block_out_channels=(32, 32, 64),
                 transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), cross_attention_dim=32,
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, norm_num_groups=16),
}
SDXL_POOLED = {"real": 1280, "tiny": 32}
SD3 = {
    "real": dict(sample_size=128, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                 joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                 pos_embed_max_size=384, dual_attention_layers=tuple(range(13))),
    "tiny": dict(sample_size=16, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                 caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16,
                 dual_attention_layers=(0,)),
}
TOKENS = {"real": (77, 333), "tiny": (8, 8)}
FLUX = {
    "real": dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                 joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)),
    "tiny": dict(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(2, 2, 4)),
}
FLUX_SIDE = {"real": 128, "tiny": 16}  # latent side: 1024 px / 8


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def library_backbone(variant: str, denoiser: torch.nn.Module, latent_side: int, device: str):
    """visalign's own backbone for the family (built from its tiny folder: scheduler, VAE factor, training
    density), with the measured ``denoiser`` swapped in and a LoRA from visalign's ``add_lora``: the step
    timed below is the library's Diffusion-DPO through the family's own noise/predict/error, not a copy."""
    import tempfile

    from visalign.config import Component
    from visalign.models.load import build_backbone
    from visalign.models.lora import LoraSpec, add_lora
    from visalign.models.tiny import build_tiny, tiny_variants

    cls = tiny_variants()[variant]
    folder = build_tiny(variant, Path(tempfile.mkdtemp()) / variant)
    kwargs = {"path": str(folder), **cls.tiny_kwargs}
    probe = build_backbone(Component(cls.family, kwargs), load_encoders=False)
    factor = probe.resolution // probe.sample_shape[-1]  # the folder's VAE factor: latents of latent_side
    bb = build_backbone(Component(cls.family, kwargs | {"resolution": latent_side * factor}), load_encoders=False)
    bb.denoiser = denoiser
    bb.to_device(torch.device(device))
    add_lora(bb, LoraSpec(rank=8, alpha=8))
    bb.unwrapped().enable_gradient_checkpointing()
    bb.unwrapped().train()
    return bb


def _bench(bb, make_batch, device: str, steps: int = 6) -> dict:
    """LoRA Diffusion-DPO steps (visalign's ``diffusion_dpo``) in bf16 autocast: median time, peak memory."""
    from visalign.registry import METHODS

    method = METHODS.build("diffusion_dpo", beta=5000.0)
    params = [p for p in bb.unwrapped().parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times, losses = [], []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = method(bb, make_batch()).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        losses.append(float(loss.detach()))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"step_s": statistics.median(times), "peak_gib": peak, "losses": losses,
            "trainable_m": sum(p.numel() for p in params) / 1e6,
            "params_m": sum(p.numel() for p in bb.unwrapped().parameters()) / 1e6}


def _pairs(b: int, channels: int, side: int, device: str, **cond_shapes) -> PreferenceBatch:
    """``b`` pairs of cached latents [b, 2, C, side, side] with random text conditioning of the given shapes."""
    from visalign.models.cond import Cond

    cond = Cond({k: torch.randn(b, *shape, device=device) for k, shape in cond_shapes.items()})
    return PreferenceBatch(prompts=[""] * b, label=torch.ones(b, device=device),
                           latent_mean=torch.randn(b, 2, channels, side, side, device=device), cond=cond)


def sdxl(attention: str, device: str = "cuda", size: str = "real", steps: int = 6) -> dict:
    from diffusers import UNet2DConditionModel

    arch = SDXL[size]  # real: the SDXL base UNet's architecture (2.6 B parameters)
    with torch.device(device):  # random init on the device itself, not on the CPU first and then copied
        unet = UNet2DConditionModel(
            in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                             "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
            addition_embed_type="text_time", **arch)
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    b, side, tokens = 2, arch["sample_size"], TOKENS[size][0]
    bb = library_backbone("sdxl", unet, side, device)
    time_ids = bb.time_ids(b, None, torch.device(device))

    def batch():
        out = _pairs(b, 4, side, device, hidden=(tokens, arch["cross_attention_dim"]), pooled=(SDXL_POOLED[size],))
        out.cond.tensors["time_ids"] = time_ids
        return out

    return _bench(bb, batch, device, steps) | {"pairs": b}


def sd3(attention: str, device: str = "cuda", size: str = "real", steps: int = 6) -> dict:
    from diffusers import SD3Transformer2DModel

    arch = SD3[size]
    with torch.device(device):
        model = SD3Transformer2DModel(patch_size=2, in_channels=16, out_channels=16, qk_norm="rms_norm", **arch)
    if attention == "xformers":
        model.enable_xformers_memory_efficient_attention()
    b, side, tokens = 2, arch["sample_size"], TOKENS[size][1]
    bb = library_backbone("sd3", model, side, device)
    return _bench(bb, lambda: _pairs(b, 16, side, device, hidden=(tokens, arch["joint_attention_dim"]),
                                     pooled=(arch["pooled_projection_dim"],)), device, steps) | {"pairs": b}


def flux(attention: str, device: str = "cuda", size: str = "real", steps: int = 6) -> dict:
    """FLUX.1-dev: the LoRA-DPO step, then one GRPO update (clipped per-step ratio) on the same backbone."""
    from diffusers import FluxTransformer2DModel

    arch = FLUX[size]
    with torch.device(device):
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True, **arch)
    model.to(torch.bfloat16)  # 12 B parameters: bf16 weights as FLUX is trained; add_lora keeps the LoRA fp32
    if attention == "xformers":
        model.enable_xformers_memory_efficient_attention()
    side, text = FLUX_SIDE[size], TOKENS[size][1] if size == "tiny" else 512
    bb = library_backbone("flux", model, side, device)
    shapes = {"hidden": (text, arch["joint_attention_dim"]), "pooled": (arch["pooled_projection_dim"],)}
    out = _bench(bb, lambda: _pairs(2, 16, side, device, **shapes), device, steps)
    out["grpo_update_s"] = _grpo_update(bb, _pairs(4, 16, side, device, **shapes), device)
    return out | {"pairs": 2}


def _grpo_update(bb, batch: PreferenceBatch, device: str, steps: int = 10) -> float:
    """One GRPO update: the backbone's own SDE-step log-density (Flow-GRPO) of stored transitions at the first
    (high-noise) step, the clipped surrogate, backward."""
    from visalign.objectives.policy import clipped_surrogate

    params = [p for p in bb.unwrapped().parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4)
    x_t, x_prev = batch.latent_mean.unbind(1)
    t = bb.sampling_scheduler(steps).timesteps[0]
    _sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16):
        logp = bb.step_logprob(x_t, x_prev, t, batch.cond, steps=steps, guidance=3.5)
        loss = clipped_surrogate(logp, logp.detach(), torch.randn(len(logp), device=device), 1e-4).mean()
    loss.backward()
    opt.step()
    _sync(device)
    return time.perf_counter() - t0


def _write(results: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)


# depth where 1024² would not fit 80 GB (Qwen-Image: 30 of its 60 layers; the plan is scaled to the same depth)
PLAN_FAMILIES = {"sdxl": "", "sd3": "", "flux": "", "qwenimage": "30", "sana": "", "pixart": ""}


def plan_runs() -> list[tuple[str, str, str, str]]:
    """(method, family, depth, quantize) in the order they run: every LoRA-DPO row, then every GRPO update,
    so that a budget cut leaves the most-asked rows."""
    return [(method, family, depth, quantize) for method in ("dpo", "grpo")
            for family, depth in PLAN_FAMILIES.items() for quantize in ("none", "int8")]


def plan_against_measured(out: str, budget_s: float = 450.0) -> dict:
    """`visalign plan`'s estimate against torch.cuda.max_memory_allocated for each real-size family, LoRA-DPO and
    one GRPO update, bf16 and int8; rows past ``budget_s`` are recorded as skipped (the lent GPU's 8 minutes).
    The activation models come from the plan cache (VISALIGN_CACHE/plan): fit them here first with
    scripts/plan_table.py and carry the folder, or the fits run on the GPU machine's CPUs."""
    from realwidth_check import main as realwidth

    if not torch.cuda.is_available():
        sys.exit("gpu_check --plan needs a CUDA GPU; on CPU run scripts/realwidth_check.py")
    results = {"device": torch.cuda.get_device_name(0)}
    start = time.perf_counter()
    for method, family, depth, quantize in plan_runs():
        key = f"plan/{method}/{family}/{quantize}"
        if time.perf_counter() - start > budget_s:
            results[key] = {"skipped": f"past the {budget_s:.0f} s budget"}
            continue
        try:
            results[key] = realwidth(["--family", family, "--resolution", "1024", "--quantize", quantize,
                                      "--device", "cuda", "--method", method, *(["--depth", depth] if depth else [])])
        except Exception as e:  # one family's failure leaves the others' rows
            results[key] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        torch.cuda.empty_cache()
        _write(results, out)
    return results


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--size", default="real", choices=tuple(SDXL))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--plan", action="store_true", help="only the planner against the measured peak: one LoRA-DPO "
                    "step and one GRPO update per real-size family at 1024², bf16 and int8, with checkpointing")
    ap.add_argument("--budget-s", type=float, default=450.0, help="--plan: skip the rows left after this long")
    args = ap.parse_args(argv)
    if args.plan:
        return plan_against_measured(args.out, args.budget_s)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU (or --device cpu --size tiny for a check of the code path)")
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    results = {"device": device_name, "size": args.size, "torch": torch.__version__}
    for name, fn in (("sdxl", sdxl), ("sd3_medium", sd3), ("flux_dev", flux)):
        for attention in ("sdpa", "xformers"):
            key = f"{name}_{'1024' if args.size == 'real' else args.size}/{attention}"
            if attention == "xformers" and importlib.util.find_spec("xformers") is None:
                results[key] = {"error": "xformers is not installed"}  # before building a 2.6 B model for nothing
            else:
                try:
                    results[key] = fn(attention, args.device, args.size, args.steps)
                    if not all(math.isfinite(v) for v in results[key]["losses"]):
                        results[key]["error"] = "non-finite loss"
                except Exception as e:  # xformers may not load for this torch build (and never on a CPU)
                    results[key] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            print(key, results[key], flush=True)
            _write(results, args.out)  # after every model: a run cut short keeps what it measured
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
