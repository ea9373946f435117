"""What an online round's pairs teach, per task (issue #35's "reward signal per task"): K samples per training
prompt from a model, ranked by a training reward as online DPO ranks them (best vs worst, kept at a margin),
and each kept pair read by GenEval's own verdict and by its object counts.

    python scripts/online_signal.py [--model assets/shapes-base] [--lora RUN/lora] [--per-task 64] [--k 4]
        [--reward "{constraints: 1.0, unrequested: 0.1}"] [--min-margin 0.15] [--seed 99] [--md OUT.md]

Per task: the share of prompts whose group yields a pair; of the kept pairs, the share whose winner is
GenEval-correct and loser wrong ("teaches the metric"), the reverse ("against it"), and the rest (both right or
both wrong: the pair moves the policy on something the metric does not score); and the share whose winner holds
more objects than its loser, fewer, or as many. A task whose pairs mostly say "more objects" and rarely
"right over wrong" is where a round's gradient drifts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def kept_pairs(group: list[dict], min_margin: float) -> list[tuple[dict, dict]]:
    """Online DPO's best-worst pair of one prompt's group, if its reward margin is at least ``min_margin``."""
    ranked = sorted(group, key=lambda r: -r["reward"])
    best, worst = ranked[0], ranked[-1]
    margin = best["reward"] - worst["reward"]
    return [(best, worst)] if margin >= min_margin and margin > 0 else []


def signal(rows: list[dict], min_margin: float) -> dict[str, dict]:
    """Per task: pair yield, the pairs' verdict directions and object-count directions (shares of kept pairs)."""
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["prompt_index"], []).append(r)
    out = {}
    for task in TASKS:
        task_groups = [g for g in groups.values() if g[0]["tag"] == task]
        pairs = [p for g in task_groups for p in kept_pairs(g, min_margin)]
        share = lambda pred, pairs=pairs: sum(pred(w, ls) for w, ls in pairs) / max(len(pairs), 1)  # noqa: E731
        out[task] = {
            "prompts": len(task_groups), "pairs": len(pairs), "yield": len(pairs) / max(len(task_groups), 1),
            "right_over_wrong": share(lambda w, ls: w["correct"] and not ls["correct"]),
            "wrong_over_right": share(lambda w, ls: ls["correct"] and not w["correct"]),
            "more_objects": share(lambda w, ls: w["objects"] > ls["objects"]),
            "fewer_objects": share(lambda w, ls: w["objects"] < ls["objects"]),
            "base_accuracy": sum(r["correct"] for g in task_groups for r in g) / max(sum(map(len, task_groups)), 1),
        }
    return out


def sample_rows(model: str, lora: str | None, per_task: int, k: int, seed: int, reward_spec) -> list[dict]:
    import torch

    from visalign.demo import sampling_backbone
    from visalign.eval.geneval import generate_and_score
    from visalign.models.load import sampling_guidance
    from visalign.rewards.base import LazyReward
    from visalign.worlds.shapes.detector import detect
    from visalign.worlds.shapes.render import balanced_records

    bb = sampling_backbone(model, lora, bf16=False)
    reward = LazyReward(reward_spec)
    with torch.no_grad():
        rows = generate_and_score(bb, balanced_records("train", per_task), k, seed=seed,
                                  guidance=sampling_guidance(bb, None))
    images = torch.stack([r["image"] for r in rows])
    scores = reward(images, [r["prompt"] for r in rows])
    for r, s in zip(rows, scores.tolist()):
        r["reward"], r["objects"] = s, len(detect(r.pop("image")).objects)
    return rows


def table(result: dict[str, dict]) -> str:
    lines = ["| task | base accuracy | prompts with a pair | right over wrong | wrong over right | "
             "winner has more objects | fewer |", "|---|---|---|---|---|---|---|"]
    for task, s in result.items():
        lines.append(f"| {task} | {s['base_accuracy']:.3f} | {s['yield']:.2f} ({s['pairs']}/{s['prompts']}) | "
                     f"{s['right_over_wrong']:.2f} | {s['wrong_over_right']:.2f} | {s['more_objects']:.2f} | "
                     f"{s['fewer_objects']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="assets/shapes-base")
    ap.add_argument("--lora", default=None)
    ap.add_argument("--per-task", type=int, default=64, help="training prompts per task (one group each)")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt (online.yaml's samples_per_prompt)")
    ap.add_argument("--reward", default="{constraints: 1.0, unrequested: 0.1}", help="a reward spec, YAML")
    ap.add_argument("--min-margin", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=99)
    ap.add_argument("--md", default="")
    args = ap.parse_args(argv)
    rows = sample_rows(args.model, args.lora, args.per_task, args.k, args.seed, yaml.safe_load(args.reward))
    result = signal(rows, args.min_margin)
    text = table(result)
    print(text)
    print(json.dumps(result))
    if args.md:
        Path(args.md).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
