"""Real-width check on CPU (issue #37, item 3): one LoRA-DPO step of a published-width denoiser (random
weights, bf16, gradient checkpointing) at a reduced latent size, bf16 and int8 (optimum-quanto), with the
process's peak resident memory during the step against `visalign plan`'s estimate of the same step.

    python scripts/realwidth_check.py --family sdxl --resolution 256 [--quantize int8] [--depth 8,16]

With ``--device cuda`` (scripts/gpu_check.py --plan) the peak is torch.cuda.max_memory_allocated. On CPU the
measured peak is the model's live tensors (a quantized weight's int8 data and scales) plus what the step adds
at its peak (the resident set sampled every 5 ms from /proc during the step, less the resident set before
it): after a post-hoc quantization the freed bf16 pages stay resident, so the resident set alone overstates
a quantized model (both are recorded). The planner's figure is its parts without the CUDA context.
FLUX.1 at its full 12B does not fit 24 GiB in bf16 on this machine, so `--depth D,S` builds it with D double
and S single blocks at full width, and the planner is scaled to the same depth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import threading
import time

import torch


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    def __init__(self):
        self.peak, self._run = rss(), True
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while self._run:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def stop(self) -> int:
        self._run = False
        self._thread.join()
        return max(self.peak, rss())


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors, each storage once (a quantized weight: its int8 data and its scales)."""
    seen, total = set(), 0
    for v in model.state_dict(keep_vars=True).values():
        parts = [getattr(v, name) for name in ("_data", "_scale") if hasattr(v, name)] or [v]
        for t in parts:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
    return total


def main(argv=None) -> dict:
    from peft import LoraConfig

    from visalign.data.cache import cache_root
    from visalign.models.plan import RunShape, activation_models, build_denoiser, plan_parts, published_config
    from visalign.models.plan_inputs import INPUTS

    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="sdxl")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--quantize", default="none", choices=["none", "int8"])
    ap.add_argument("--depth", default="", help="D,S: blocks per depth key (a DiT too large at full depth)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    torch.set_num_threads(os.cpu_count() or 2)
    config = published_config(args.family)
    if args.depth:
        config |= dict(zip(config["_depth_keys"], (int(d) for d in args.depth.split(","))))
    before = rss()
    torch.set_default_dtype(torch.bfloat16)  # random init straight in bf16: never a whole fp32 copy
    with torch.device(args.device):
        model = build_denoiser(config, empty=False, dtype=torch.bfloat16)
    torch.set_default_dtype(torch.float32)
    if args.quantize == "int8":
        from optimum.quanto import freeze, qint8, quantize

        quantize(model, weights=qint8)
        freeze(model)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    model.enable_gradient_checkpointing()
    model.train()
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    inputs = INPUTS[config["_class_name"]](config, args.resolution, 2, config["_text_tokens"], torch.bfloat16)
    if cuda:  # on a GPU the peak is the allocator's, from the model's weights up
        inputs = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in inputs.items()}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = 0
    built = torch.cuda.memory_allocated() if cuda else rss()
    watch = PeakRss()
    t0 = time.time()
    out = model(**inputs)
    pred = out[0] if isinstance(out, tuple) else out.sample
    with torch.no_grad():  # the reference: the same weights with the adapters off
        model.disable_adapters()
        ref = model(**inputs)
        ref = (ref[0] if isinstance(ref, tuple) else ref.sample).float()
        model.enable_adapters()
    err = (pred.float() - ref).pow(2).flatten(1).mean(1)  # stands in for the denoising errors of w and l
    loss = -torch.nn.functional.logsigmoid(-(err[0] - err[1]))
    loss.backward()
    opt.step()
    peak = torch.cuda.max_memory_allocated() if cuda else watch.stop()
    free, ckpt = activation_models(published_config(args.family), args.family, cache_root() / "plan")
    shape = RunShape(family=args.family, resolution=args.resolution, batch=1, images_per_sample=2, lora_rank=8,
                     quantize=args.quantize, checkpointing=True, compute="bf16", weights="bf16",
                     cache_complete=True)
    parts = plan_parts(dataclasses.replace(shape), config, free, ckpt)
    planned = sum(v for k, v in parts.items() if not k.startswith("allocator"))
    held = model_bytes(model)  # the model as it lives (int8 data and scales once quantized)
    step = peak - built  # what the step added: activations, gradients, optimizer states, recomputation
    result = {"family": args.family, "depth": args.depth or "full", "resolution": args.resolution,
              "quantize": args.quantize, "parameters": sum(p.numel() for p in model.parameters()),
              "measured_peak_gib": (held + step) / 2**30, "model_gib": held / 2**30, "step_added_gib": step / 2**30,
              "resident_peak_gib": (peak - before) / 2**30, "planned_gib": planned / 2**30,
              "ratio": planned / (held + step), "step_seconds": time.time() - t0}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
