"""Step time of each method against its compute limit, on identical cached inputs, in one process.

    python scripts/bench_train.py [--model pixel|sd15|sdxl|sd3] [--methods diffusion_dpo,kto,...] [--steps 20]

Per method: median step time (after warm-up), pairs/s, peak RSS, and the limit: the forwards and
backwards the method cannot avoid, timed alone on the same tensors (for pair methods: the policy
forward + backward on the 2B images, the reference forward on 2B under no_grad, the optimizer step).
Prints step/limit; the target is <= 1.10 with the cache on.
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _median_time(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _step(method, bb, batch, opt, ctx) -> None:
    with ctx:
        out = method(bb, batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _limit(method, bb, batch, opt, ctx) -> None:
    """What a pair method cannot avoid: policy forward+backward on 2B, reference forward on 2B, optimizer step."""
    from visalign.objectives.base import errors, model_inputs

    with ctx:
        x0, cond = model_inputs(bb, batch)
        err, _ = errors(bb, x0, cond, reference=getattr(method, "uses_reference", True))
    err.mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pixel", choices=("pixel", "sd15", "sdxl", "sd3"))
    ap.add_argument("--methods", default="diffusion_dpo,kto,mapo,inpo,smpo")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import write_pairs

    from visalign.cli import _quiet_libraries
    from visalign.config import load_config
    from visalign.data.cache import CachedDataset, build_cache, cache_dir_for
    from visalign.data.pairs import PreferenceDataset
    from visalign.models.tiny import build_tiny
    from visalign.train.setup import build_backbone, build_method, build_optimizer, prepare_trainable

    _quiet_libraries()
    tmp = Path(tempfile.mkdtemp())
    model_dir = build_tiny(args.model, tmp / args.model)
    data = write_pairs(tmp / "pairs.parquet", n=64, scores=True)
    preset, backbone_name = {"pixel": ("shapes", "pixel"), "sd15": ("sd15", "sd"), "sdxl": ("sdxl", "sdxl"),
                             "sd3": ("sd3", "sd3")}[args.model]
    print(f"model {args.model} (tiny), batch {args.batch_size} pairs, {args.threads} thread(s), "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}")
    print(f"{'method':<16}{'step ms':>9}{'limit ms':>10}{'step/limit':>12}{'pairs/s':>9}{'peak RSS MB':>13}")
    for name in args.methods.split(","):
        over = [f"model.name={backbone_name}", f"model.path={model_dir}", f"data.path={data}", f"objective={name}"]
        if args.model == "sd3":
            over.append("model.max_sequence_length=8")
        cfg = load_config(preset, [], over)
        bb = build_backbone(cfg.model)
        params = prepare_trainable(bb, cfg)
        opt = build_optimizer(params, cfg)
        method = build_method(cfg.objective)
        ds = PreferenceDataset(str(data), resolution=bb.resolution)
        cached = CachedDataset(build_cache(bb, ds, cache_dir_for(ds, bb, str(tmp / "cache"))), ds)
        batch = cached.collate([cached[i] for i in range(args.batch_size)])
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)

        parts = (method, bb, batch, opt, ctx)
        t_step = _median_time(functools.partial(_step, *parts), args.steps)
        t_limit = _median_time(functools.partial(_limit, *parts), args.steps)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{name:<16}{t_step * 1e3:>9.1f}{t_limit * 1e3:>10.1f}{t_step / t_limit:>12.2f}"
              f"{args.batch_size / t_step:>9.1f}{rss:>13.0f}")


if __name__ == "__main__":
    main()
