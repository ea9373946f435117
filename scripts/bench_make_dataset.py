"""make-dataset throughput (generation + scoring + ranking + writing) against raw sampling, same prompts and seeds.

    python scripts/bench_make_dataset.py [--model assets/shapes-base] [--prompts 32] [--k 4] [--steps 20]

Prints images/s of the pipeline's own sampling loop and of make-dataset end to end, and their ratio
(target >= 0.8).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="assets/shapes-base")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from visalign.cli import quiet_libraries
    from visalign.config import Component
    from visalign.data.make_dataset import MakeDatasetConfig, image_seed, make_dataset, parse_model
    from visalign.data.prompts import read_prompts
    from visalign.train.build import build_backbone

    quiet_libraries()
    name, path = parse_model(args.model)
    prompts = read_prompts("shapes:train")[: args.prompts]
    bb = build_backbone(Component(name, {"path": path}))
    jobs = [(i, k) for i in range(len(prompts)) for k in range(args.k)]
    bb.sample(prompts[:2], steps=2)  # warm-up
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(jobs), args.batch_size):
            part = jobs[s:s + args.batch_size]
            noise = torch.stack([torch.randn(bb.sample_shape, generator=torch.Generator().manual_seed(
                image_seed(0, i, 0, k))) for i, k in part])
            bb.sample([prompts[i] for i, _ in part], steps=args.steps, guidance=3.0, latents=noise)
    raw = len(jobs) / (time.perf_counter() - t0)
    out = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    make_dataset(MakeDatasetConfig(prompts="shapes:train", models=[f"{name}={path}"], images_per_prompt=args.k,
                                   rewards=["shapes"], out=str(out), steps=args.steps, guidance=3.0,
                                   batch_size=args.batch_size, shard_size=args.prompts, max_prompts=args.prompts,
                                   pairs="best-worst"), progress=False)
    full = len(jobs) / (time.perf_counter() - t0)
    shutil.rmtree(out, ignore_errors=True)
    print(f"{len(jobs)} images, {args.steps} steps, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"raw sampling: {raw:.2f} img/s   make-dataset (sample + score + rank + write): {full:.2f} img/s   "
          f"ratio {full / raw:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
