"""ShapesWorld Diffusion-DPO past the demo's budget: several recipes trained side by side on one device, each
scored on held-out prompts against the base with the same seeds (paired SE).

    python scripts/scale_shapes_dpo.py --out runs/scale --budget-s 240 --per-task 200 \\
        --run b16=data.path=runs/demo/data/pairs,train.batch_size=16,train.lr=5e-5 \\
        --run b64=data.path=runs/demo/data/pairs,train.batch_size=64,train.lr=5e-5
    python scripts/scale_shapes_dpo.py ... --make-data big16:16   # also build data/big16 (16 samples per prompt)

Every run is the demo's recipe (`visalign finetune shapes`, Diffusion-DPO, LoRA r8, beta 5000) plus its
overrides, which may switch the method (`objective=d3po,objective.steps=20,data.path=shapes:train`).
Runs get a wall-clock budget rather than a step count: a short calibration run measures the step time
while all runs share the device, and the real run takes as many steps as fit in ``--budget-s``.
Evaluation is the demo's (GenEval-shapes, 20 DDIM steps, guidance 1.5, the demo's seeds or ``--seed``)
with ``--per-task`` samples per task; ``summary.json`` holds each run's change against the base and its paired SE, and
``base/`` and ``NAME/eval/`` the per-image results and grids.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CALIBRATION_STEPS = 30


def evaluate(base: str, lora: str | None, per_task: int, out: Path, seed: int) -> list[dict]:
    """Held-out GenEval-shapes results, written to ``out`` (metrics.json, results.jsonl, grid.png)."""
    from visalign.demo import heldout_results, sampling_backbone
    from visalign.eval.geneval import write_results

    results = heldout_results(sampling_backbone(base, lora), per_task, seed=seed)
    write_results(results, out)
    return results


def _train(base: str, out: Path, steps: int, overrides: list[str]) -> dict:
    from visalign.config import load_config
    from visalign.demo import fast_bf16
    from visalign.train.loop import train

    precision = "bf16" if fast_bf16() else "no"  # emulated bf16 (no AMX) runs about 17x slower than fp32
    cfg = load_config("shapes", [], [f"model.path={base}", f"train.output_dir={out}", f"train.steps={steps}",
                                     "train.warmup_steps=10", "train.save_every=0", "train.log_every=50",
                                     f"train.mixed_precision={precision}", "lora.rank=8", "lora.alpha=8", *overrides])
    return train(cfg)


def worker(args) -> None:
    """One run: calibrate, train for the budget, evaluate, write result.json."""
    from visalign.demo import paired_improvement
    from visalign.eval.geneval import summarise

    out = Path(args.out) / args.worker
    overrides = [o for o in args.overrides.split(",") if o]
    t0 = time.time()
    calib = _train(args.base, out / "calibration", CALIBRATION_STEPS, overrides)
    step_s = calib["seconds"] / CALIBRATION_STEPS
    steps = max(CALIBRATION_STEPS, int((args.budget_s - (time.time() - t0)) / step_s) // 10 * 10)
    summary = _train(args.base, out / "run", steps, overrides)
    tuned = evaluate(args.base, summary["lora"], args.per_task, out / "eval", args.seed)
    base = [json.loads(line) for line in (Path(args.out) / "base" / "results.jsonl").read_text().splitlines()]
    metrics = summarise(tuned)
    result = {"name": args.worker, "overrides": overrides, "steps": summary["steps"],
              "pairs_seen": summary["pairs_seen"], "train_s": summary["seconds"], "step_s": step_s,
              "overall": metrics["overall"], "tasks": {k: v["accuracy"] for k, v in metrics["tasks"].items()},
              **paired_improvement(base, tuned)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)


def make_data(out: Path, base: str, spec: str) -> None:
    from visalign.demo import build_demo_data

    name, per_prompt, *per_task = spec.split(":")
    summary = build_demo_data(out / "data" / name, base, per_task=int(per_task[0]) if per_task else 40,
                              images_per_prompt=int(per_prompt), steps=10, progress=False)
    print(f"data {name}: {summary['images']} images in {summary['seconds']:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", default="assets/shapes-base")
    ap.add_argument("--run", action="append", default=[], help="NAME=key=value,key=value,...")
    ap.add_argument("--make-data", action="append", default=[],
                    help="NAME:IMAGES_PER_PROMPT[:PROMPTS_PER_TASK] -> OUT/data/NAME/pairs")
    ap.add_argument("--budget-s", type=float, default=240.0, help="training seconds per run (calibration included)")
    ap.add_argument("--per-task", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234, help="evaluation seed (the demo's: 1234; fresh: any other)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per run (0: cores / runs)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    from visalign.cli import quiet_libraries
    from visalign.registry import load_all

    quiet_libraries()
    load_all()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for spec in args.make_data:
        make_data(out, args.base, spec)
    t0 = time.time()
    base = evaluate(args.base, None, args.per_task, out / "base", args.seed)
    from visalign.eval.geneval import summarise

    print(f"base {summarise(base)['overall']:.3f} ({len(base)} samples, {time.time() - t0:.0f}s)", flush=True)
    threads = args.threads or max(1, (os.cpu_count() or 2) // max(len(args.run), 1))
    procs = []
    for spec in args.run:
        name, _, overrides = spec.partition("=")
        cmd = [sys.executable, __file__, "--out", str(out), "--base", args.base, "--worker", name,
               "--overrides", overrides.replace("{out}", str(out)), "--budget-s", str(args.budget_s),
               "--per-task", str(args.per_task), "--seed", str(args.seed), "--threads", str(threads)]
        log = open(out / f"{name}.log", "w")
        procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    rows = []
    for name, proc, log in procs:
        proc.wait()
        log.close()
        result = out / name / "result.json"
        rows.append(json.loads(result.read_text()) if result.exists() else {"name": name, "error": proc.returncode})
    summary = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               "base_overall": summarise(base)["overall"], "per_task": args.per_task, "runs": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<14} failed (exit {r['error']}): see {out / (r['name'] + '.log')}")
        else:
            print(f"{r['name']:<14} {r['steps']:>6} steps {r['overall']:.3f}  change {r['delta']:+.3f} "
                  f"+- {r['se']:.3f}  (z {r['z']:+.1f})")
    return summary


if __name__ == "__main__":
    main()
