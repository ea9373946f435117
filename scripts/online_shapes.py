"""Online methods on ShapesWorld: train one recipe from the shipped base, then score GenEval-shapes on the
held-out split with fresh seeds, paired against the base (same prompts and seeds, fp32 sampling).

    python scripts/online_shapes.py --out runs/online/grpo -c configs/shapes/grpo.yaml [--per-task 200]
        [--seed 4321] [key=value ...]

Writes OUT/run (the finetune run: metrics.jsonl holds the training-prompt reward per step), the base's verdicts
(OUT/../base-BASE-seedS-nN.jsonl, shared by runs side by side)
and OUT/tuned.jsonl (per-image verdicts) and OUT/result.json: the paired change overall and per task with
SEs, the training wall time, and the number of trajectories sampled.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def evaluate(base_path: str, lora: str | None, per_task: int, seed: int, file: Path, split: str = "eval"
             ) -> list[dict]:
    from visalign.demo import heldout_results, sampling_backbone

    if file.exists():
        return [json.loads(x) for x in file.read_text().splitlines()]
    bb = sampling_backbone(base_path, lora, bf16=False)  # fp32: bf16 flips verdicts between devices
    rows = [{k: v for k, v in r.items() if k != "image"}
            for r in heldout_results(bb, per_task, seed=seed, split=split)]
    tmp = file.with_name(file.name + ".tmp")  # renamed when complete: a killed run leaves no half file
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(file)
    return rows


def tuned_model(run: Path, base_path: str) -> tuple[str, str | None]:
    """The trained model as (model folder, LoRA or None): a LoRA run writes RUN/lora over the base, a full
    fine-tune (lora.enabled=false) writes the whole model folder RUN/model."""
    return (str(run / "model"), None) if (run / "model").is_dir() else (base_path, str(run / "lora"))


def miscounts(rows: list[dict]) -> dict:
    """Counting prompts' failures by kind: too many objects (the exclude clause: 'expected X<N+1') or too few."""
    over = under = 0
    for r in rows:
        if r.get("tag") != "counting" or r.get("correct"):
            continue
        reasons = r.get("reasons", [])
        over += any("<" in x for x in reasons)
        under += any(">=" in x for x in reasons)
    return {"over": over, "under": under}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("-c", "--config", action="append", default=[])
    ap.add_argument("--base", default="assets/shapes-base")
    ap.add_argument("--per-task", type=int, default=200, help="held-out samples per task (6 tasks)")
    ap.add_argument("--seed", type=int, default=4321, help="evaluation seed (fresh: not the demo's 1234)")
    ap.add_argument("--train-per-task", type=int, default=0,
                    help="also score this many samples per task of the training prompts (train vs held-out gap)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from visalign.config import load_config
    from visalign.train.loop import train

    out = Path(args.out)
    run = out / "run"
    t0 = time.time()
    if not (run / "summary.json").exists():
        cfg = load_config("shapes", args.config, [f"model.path={args.base}", f"train.output_dir={run}",
                                                  *args.overrides])
        train(cfg)
    summary = json.loads((run / "summary.json").read_text())
    # the base's verdicts depend only on (base, seed, per_task): runs side by side share one file
    shared = out.parent / f"base-{Path(args.base).name}-seed{args.seed}-n{args.per_task}.jsonl"
    base = evaluate(args.base, None, args.per_task, args.seed, shared)
    model, lora = tuned_model(run, args.base)
    tuned = evaluate(model, lora, args.per_task, args.seed, out / "tuned.jsonl")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    from visalign.eval.stats import paired_by_task

    extra = {"counting_miscounts": {"base": miscounts(base), "tuned": miscounts(tuned)}}
    if args.train_per_task:  # the same protocol on training prompts: a large gap means prompts were learned
        n = args.train_per_task
        train_base = evaluate(args.base, None, n, args.seed, out.parent / f"base-{Path(args.base).name}-train"
                              f"-seed{args.seed}-n{n}.jsonl", split="train")
        train_tuned = evaluate(model, lora, n, args.seed, out / "tuned-train.jsonl", split="train")
        extra["train_prompts"] = paired_by_task(train_base, train_tuned) | {"per_task": n}
    result = paired_by_task(base, tuned) | extra | {
        "train_seconds": summary["seconds"], "steps": summary["steps"], "trajectories_trained": summary["pairs_seen"],
        "reward_first": rows[0].get("reward_mean"), "reward_last": rows[-1].get("reward_mean"),
        "eval_seed": args.seed, "per_task": args.per_task, "wall_seconds": time.time() - t0}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    o = result["overall"]
    print(f"overall {o['delta']:+.3f} ± {o['se']:.3f} ({o['z']:.1f} SE) on {6 * args.per_task} paired samples")
    for tag, v in result["tasks"].items():
        print(f"  {tag:<14} {v['base']:.3f} -> {v['tuned']:.3f}  {v['change']:+.3f} ± {v['se']:.3f}")
    return result


if __name__ == "__main__":
    main()
