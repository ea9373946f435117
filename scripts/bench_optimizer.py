"""Optimizer-state memory and step time of DCT-AdamW against AdamW on a full fine-tune, measured in one run.

    python scripts/bench_optimizer.py [--base assets/shapes-base] [--ranks 8,32,64] [--steps 5] [--threads 0]

Full fine-tuning of the ShapesWorld base denoiser with the Diffusion-DPO loss on seeded random pairs:
the bytes held in the optimizer's state after the first step (AdamW: two moments per weight; DCT-AdamW:
two rank-r moments per matrix plus r indices), the ratio to AdamW, and the mean step time. Prints one table.
"""

from __future__ import annotations

import argparse
import time


def run(base: str, optimizer: str, rank: int, steps: int) -> dict:
    import torch

    from visalign.config import load_config
    from visalign.objectives.base import denoising_errors
    from visalign.objectives.implicit import dpo_logit
    from visalign.train.build import build_backbone, build_optimizer, prepare_trainable
    from visalign.train.dct_adamw import state_bytes

    cfg = load_config("shapes", [], [f"model.path={base}", "lora.enabled=false", f"train.optimizer={optimizer}",
                                     f"train.optimizer_rank={rank}", "train.lr=1e-5"])
    torch.manual_seed(0)
    bb = build_backbone(cfg.model)
    params = prepare_trainable(bb, cfg)
    opt = build_optimizer(params, cfg)
    cond = bb.encode_prompts(["a photo of a red circle", "a photo of two squares"] * 4)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn((8, 2, *bb.sample_shape), generator=gen)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        err, ref = denoising_errors(bb, x0, cond)
        loss = -torch.nn.functional.logsigmoid(dpo_logit(err[:, 0], err[:, 1], ref[:, 0], ref[:, 1], 5000.0)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in params)
    return {"optimizer": optimizer, "rank": rank, "state_mb": state_bytes(opt) / 2**20, "params_m": n_params / 1e6,
            "step_s": sum(times[1:]) / max(len(times) - 1, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="assets/shapes-base")
    ap.add_argument("--ranks", default="8,32,64")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [run(args.base, "adamw", 32, args.steps)]
    rows += [run(args.base, "dct_adamw", int(r), args.steps) for r in args.ranks.split(",")]
    ref = rows[0]
    print(f"full fine-tune of {args.base}: {ref['params_m']:.2f} M trainable parameters")
    print("| optimizer | rank | state (MiB) | state vs AdamW | step (s) | step vs AdamW |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['rank'] if r['optimizer'] != 'adamw' else '—'} | {r['state_mb']:.2f} | "
              f"{r['state_mb'] / ref['state_mb']:.3f} | {r['step_s']:.3f} | {r['step_s'] / ref['step_s']:.2f} |")


if __name__ == "__main__":
    main()
