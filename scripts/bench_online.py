"""Where online methods spend their time: one round's rollouts against one optimizer update, measured in one run.

    python scripts/bench_online.py [--base assets/shapes-base] [--methods grpo,disco,online_dpo] [--threads 0]
                                   [--rollout-methods grpo,online_dpo]

For each method at its ShapesWorld recipe (configs/shapes/<method>.yaml): seconds per rollout (sampling and
scoring, no grad) and per update (forward + backward of one batch), and the sampling share of a round
(round_steps updates per round). Then rollouts per minute of a whole round at each rollout setting (fp32;
``train.rollout_precision=bf16``; GRPO's noisy window, ``objective.noise=window``; rollouts of 10 sampler
steps, Flow-GRPO's shorter training trajectories, ``objective.steps=10``), against the
batched-forward limit: the round's ``steps`` guided forwards alone (cond and uncond in one batch, the whole
round at once) in the same precision. Prints two tables; numbers are wall seconds on this machine.
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


ROLLOUT_SETTINGS = {  # name -> overrides on the method's recipe; the first is the baseline
    "fp32": [],
    "bf16": ["train.rollout_precision=bf16"],
    "noisy window": ["objective.noise=window"],
    "10 sampler steps": ["objective.steps=10"],
}


def _round_setup(method_name: str, base: str, overrides: list[str]):
    import torch

    from visalign.config import load_config
    from visalign.train.build import build_backbone, build_method

    cfg = load_config("shapes", [f"configs/shapes/{method_name}.yaml"], [f"model.path={base}", *overrides])
    method = build_method(cfg.objective, guidance=cfg.train.guidance)
    backbone = build_backbone(cfg.model)
    backbone.rollout_dtype = torch.bfloat16 if cfg.train.rollout_precision == "bf16" else None
    backbone.unwrapped().eval()
    return cfg, method, backbone


def rollout_rate(method_name: str, base: str, setting: str, round_prompts: int = 0) -> dict:
    """Rollouts per minute of one whole round at ``setting`` (``round_prompts`` > 0: that many prompts per
    round instead of the recipe's), and of its batched-forward limit."""
    import torch

    from visalign.data.prompts import read_prompts

    size = [f"objective.prompts_per_round={round_prompts}"] if round_prompts else []
    cfg, method, backbone = _round_setup(method_name, base, ROLLOUT_SETTINGS[setting] + size)
    prompts = read_prompts("shapes:train")
    n = method.prompts_per_round * getattr(method, "group_size", getattr(method, "k", 1))
    with torch.no_grad(), backbone.rollout_sampling():
        method.make_round(backbone, prompts[:2], torch.Generator().manual_seed(1))  # warm-up: kernels, allocators
        t0 = time.perf_counter()
        method.make_round(backbone, prompts, torch.Generator().manual_seed(0))
        round_s = time.perf_counter() - t0
    limit_s = forward_limit(backbone, prompts[:n] * (n // len(prompts[:n]) + 1), n, method.steps, cfg.train.guidance)
    return {"method": method_name, "setting": setting, "rollouts": n, "per_min": 60 * n / round_s,
            "limit_per_min": 60 * n / limit_s}


def forward_limit(backbone, prompts: list[str], n: int, steps: int, guidance: float) -> float:
    """Seconds for ``steps`` guided forwards of ``n`` images in one batch: what no sampler can beat."""
    import torch

    x = torch.randn((n, *backbone.sample_shape)).to(backbone.device)
    with torch.no_grad(), backbone.rollout_autocast():
        cond = backbone.encode_prompts(prompts[:n])
        uncond = backbone.unconditional(n, guidance)
        t = backbone.sampling_scheduler(steps).timesteps
        backbone.guided(x, t[0], cond, uncond, guidance)  # warm-up
        t0 = time.perf_counter()
        for ti in t:
            backbone.guided(x, ti, cond, uncond, guidance)
        return time.perf_counter() - t0


def print_rates(rates: list[dict]) -> None:
    base = {}
    for r in rates:  # each method's first setting is its baseline
        base.setdefault(r["method"], r["per_min"])
    print("| method | rollouts | setting | rollouts per min | vs first | batched-forward limit per min | of limit |")
    print("|---|---|---|---|---|---|---|")
    for r in rates:
        print(f"| {r['method']} | {r['rollouts']} | {r['setting']} | {r['per_min']:.0f} "
              f"| {r['per_min'] / base[r['method']]:.2f}x | {r['limit_per_min']:.0f} "
              f"| {r['per_min'] / r['limit_per_min']:.0%} |")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="assets/shapes-base")
    ap.add_argument("--methods", default="grpo,disco,online_dpo")
    ap.add_argument("--rollout-methods", default="grpo,online_dpo")
    ap.add_argument("--rollout-settings", default=",".join(ROLLOUT_SETTINGS),
                    help=f"comma-separated, from: {', '.join(ROLLOUT_SETTINGS)} (the first is the baseline)")
    ap.add_argument("--round-prompts", type=int, default=0, help="prompts per round in the rollout table "
                    "(0: each recipe's own; fewer keeps a slow setting's round short)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(m, args.base) for m in filter(None, args.methods.split(","))]
    print("| method | rollouts per round | s per rollout | s per update (batch) | updates per round | sampling share |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['rollouts']} | {r['per_rollout_s']:.3f} | {r['per_update_s']:.2f} ({r['batch']}) "
              f"| {r['round_steps']} | {r['sampling_share']:.0%} |")
    rates = []
    for m in filter(None, args.rollout_methods.split(",")):
        for setting in args.rollout_settings.split(","):
            if "window" in setting and m not in ("grpo", "disco"):
                continue  # the noisy window is the policy-gradient sampler's; others sample clean images
            rates.append(rollout_rate(m, args.base, setting, args.round_prompts))
    print()
    print_rates(rates)
    return rows + rates


if __name__ == "__main__":
    main()
