"""Real-width check on CPU (issue #37, item 3): one LoRA-DPO step of a published-width denoiser (random
weights, bf16, gradient checkpointing) at a reduced latent size, bf16 and int8 (optimum-quanto), with the
process's peak resident memory during the step against `visalign plan`'s estimate of the same step.

    python scripts/realwidth_check.py --family sdxl --resolution 256 [--quantize int8] [--depth 8,16]
                                      [--method dpo|grpo] [--out FILE]
    python scripts/realwidth_check.py --table FILE      (the docs' table of FILE's lines)

``--method grpo`` runs one GRPO update instead: the clipped surrogate of two stored rollouts' SDE-step
log-densities at one sampler step (one forward of 2 images with grad), with the round's 32 rollouts x 11
states kept beside it, against the plan's GRPO shape (batch 2 x 1 image, 32 rollouts of 10 steps).

With ``--device cuda`` (scripts/gpu_check.py --plan) the peak is torch.cuda.max_memory_allocated. On CPU the
measured peak is the model's live tensors (a quantized weight's int8 data and scales) plus what the step adds
at its peak in live tensors (PyTorch's memory-profiler timeline of every allocation and free, the analogue of
max_memory_allocated); the resident set sampled every 5 ms is recorded beside it, but it overstates both
(freed heap pages stay resident: after a post-hoc quantization, and between a step's many small tensors).
The planner's figure is its parts without the CUDA context. FLUX.1 at its full 12B does not fit 24 GiB in
bf16 on this machine, so `--depth D,S` builds it with D double and S single blocks at full width, and the
planner is scaled to the same depth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import threading
import time
from pathlib import Path

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


ROLLOUTS = 32  # a GRPO round's trajectories kept while it trains (4 prompts x 8)


def _output(out) -> torch.Tensor:
    return (out[0] if isinstance(out, tuple) else out.sample).float()


def dpo_step(model, inputs: dict) -> None:
    """A LoRA-DPO step's memory: the policy's forward of a pair with grad, the reference's (adapters off)."""
    pred = _output(model(**inputs))
    with torch.no_grad():  # the reference: the same weights with the adapters off
        model.disable_adapters()
        ref = _output(model(**inputs))
        model.enable_adapters()
    err = (pred - ref).pow(2).flatten(1).mean(1)  # stands in for the denoising errors of w and l
    (-torch.nn.functional.logsigmoid(-(err[0] - err[1]))).backward()


def grpo_step(model, inputs: dict) -> None:
    """A GRPO update's memory: the round's stored rollouts, one forward of two of them with grad, the Gaussian
    log-density of their stored next states, the clipped surrogate (Flow-GRPO), backward."""
    from visalign.objectives.policy import clipped_surrogate

    x_t = next(v for k, v in inputs.items() if k in ("sample", "hidden_states"))
    kept = torch.randn((ROLLOUTS, 11, *x_t.shape[1:]), device=x_t.device, dtype=torch.float32)  # traj of a round
    v = _output(model(**inputs))
    x_prev = x_t.float() - 0.1 * v.detach() + 0.05 * torch.randn_like(v)
    logp = (-(x_prev - (x_t.float() - 0.1 * v)) ** 2 / (2 * 0.05**2)).flatten(1).mean(1)
    loss = clipped_surrogate(logp, logp.detach(), torch.tensor([1.0, -1.0], device=v.device), 1e-4).mean()
    loss.backward()
    del kept


def table(path: str) -> str:
    """The results table of a file of ``--out`` lines (docs/results.md)."""
    lines = ["| model | method | size | quantize | model GiB | step added GiB | measured GiB | plan GiB | "
             "plan / measured |", "|---|---|---|---|---|---|---|---|---|"]
    for r in map(json.loads, Path(path).read_text().splitlines()):
        size = "full depth" if r["depth"] == "full" else f"{r['depth']} depth"
        lines.append(f"| {r['family']} ({size}, {r['parameters'] / 1e9:.2f}B) | {r['method']} | "
                     f"{r['resolution']}² | {r['quantize']} | {r['model_gib']:.2f} | {r['step_added_gib']:.2f} | "
                     f"{r['measured_peak_gib']:.2f} | {r['planned_gib']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    from peft import LoraConfig

    from visalign.data.cache import cache_root
    from visalign.models.plan import RunShape, build_denoiser, plan_parts, published_config
    from visalign.models.plan_fit import activation_models, peak_tensor_bytes, tensor_bytes
    from visalign.models.plan_inputs import INPUTS

    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="sdxl")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--quantize", default="none", choices=["none", "int8"])
    ap.add_argument("--depth", default="", help="D,S: blocks per depth key (a DiT too large at full depth)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--method", default="dpo", choices=("dpo", "grpo"))
    ap.add_argument("--out", default="")
    ap.add_argument("--table", default="", help="print the table of this file of --out lines, and stop")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.table))
        return {}
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

    def step_fn():
        (grpo_step if args.method == "grpo" else dpo_step)(model, inputs)
        opt.step()

    if cuda:
        step_fn()
        peak = torch.cuda.max_memory_allocated()
    else:  # the profiler's live-tensor peak is the measure; the resident set's is recorded beside it
        tensors_added = peak_tensor_bytes(step_fn, alive=tensor_bytes(model, inputs))  # weights: in ``held``
        peak = watch.stop()
    free, ckpt = activation_models(published_config(args.family), args.family, cache_root() / "plan")
    per_method = {"dpo": {"batch": 1, "images_per_sample": 2},
                  "grpo": {"batch": 2, "images_per_sample": 1, "rollouts": ROLLOUTS, "rollout_steps": 10}}
    shape = RunShape(family=args.family, resolution=args.resolution, lora_rank=8, quantize=args.quantize,
                     checkpointing=True, compute="bf16", weights="bf16", cache_complete=True,
                     **per_method[args.method])
    parts = plan_parts(dataclasses.replace(shape), config, free, ckpt)
    planned = sum(v for k, v in parts.items() if not k.startswith("allocator"))
    held = tensor_bytes(model)  # the model as it lives (int8 data and scales once quantized)
    # what the step added: activations, gradients, optimizer states, recomputation
    step = peak - built if cuda else tensors_added
    result = {"family": args.family, "method": args.method, "depth": args.depth or "full",
              "resolution": args.resolution,
              "quantize": args.quantize, "parameters": sum(p.numel() for p in model.parameters()),
              "measured_peak_gib": (held + step) / 2**30, "model_gib": held / 2**30, "step_added_gib": step / 2**30,
              "resident_peak_gib": (peak - before) / 2**30, "planned_gib": planned / 2**30,
              **({} if cuda else {"step_added_resident_gib": (peak - built) / 2**30}),
              "ratio": planned / (held + step), "step_seconds": time.time() - t0}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
