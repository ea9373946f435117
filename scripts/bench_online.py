"""Where online methods spend their time: one round's rollouts against one optimizer update, measured in one run.

    python scripts/bench_online.py [--base assets/shapes-base] [--methods grpo,disco,online_dpo] [--threads 0]

For each method at its ShapesWorld recipe (configs/shapes/<method>.yaml): seconds per rollout (sampling and
scoring, no grad) and per update (forward + backward of one batch), and the sampling share of a round
(round_steps updates per round). Prints one table; numbers are wall seconds on this machine.
"""

from __future__ import annotations

import argparse
import time


def measure(method_name: str, base: str, repeats: int = 2) -> dict:
    import torch

    from visalign.config import load_config
    from visalign.data.prompts import read_prompts
    from visalign.train.build import build_backbone, build_method, prepare_trainable

    cfg = load_config("shapes", [f"configs/shapes/{method_name}.yaml"], [f"model.path={base}"])
    method = build_method(cfg.objective, guidance=cfg.train.guidance)
    backbone = build_backbone(cfg.model)
    params = prepare_trainable(backbone, cfg)
    prompts = read_prompts("shapes:train")
    gen = torch.Generator().manual_seed(0)
    backbone.unwrapped().eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        items = method.make_round(backbone, prompts, gen)
    sample_s = time.perf_counter() - t0
    rollouts = method.prompts_per_round * getattr(method, "group_size", getattr(method, "k", 1))
    backbone.unwrapped().train()
    opt = torch.optim.AdamW(params, lr=1e-6)
    times = []
    for r in range(repeats + 1):
        batch = method.take(items, torch.arange(cfg.train.batch_size))
        t0 = time.perf_counter()
        method(backbone, batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if r:  # the first update warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    update_s = sum(times) / len(times)
    round_s = sample_s + method.round_steps * update_s
    return {"method": method_name, "rollouts": rollouts, "per_rollout_s": sample_s / rollouts,
            "per_update_s": update_s, "batch": cfg.train.batch_size, "round_steps": method.round_steps,
            "sampling_share": sample_s / round_s}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="assets/shapes-base")
    ap.add_argument("--methods", default="grpo,disco,online_dpo")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(m, args.base) for m in args.methods.split(",")]
    print("| method | rollouts per round | s per rollout | s per update (batch) | updates per round | sampling share |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['rollouts']} | {r['per_rollout_s']:.3f} | {r['per_update_s']:.2f} ({r['batch']}) "
              f"| {r['round_steps']} | {r['sampling_share']:.0%} |")
    return rows


if __name__ == "__main__":
    main()
