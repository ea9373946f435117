"""The online comparison's table: every `scripts/online_shapes.py` run under a folder, one row each.

    python scripts/online_table.py runs/online [--out docs-table.md]

A row: the method (the run folder's name), its training wall time, the rollouts (or pairs) its updates saw
(the run summary's pairs_seen), the training-prompt reward over its first and last eight logged steps,
GenEval-shapes' paired change per task and overall with paired SEs, and the evaluation's seed and size.
Runs scored on different seeds or sample counts are refused: their changes would not be comparable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def reward_ends(metrics: Path, span: int = 8) -> tuple[float | None, float | None]:
    """Mean training-prompt reward over the first and the last ``span`` logged steps (None: not logged)."""
    rewards = [r["reward_mean"] for r in map(json.loads, metrics.read_text().splitlines())
               if r.get("reward_mean") is not None] if metrics.exists() else []
    if not rewards:
        return None, None
    return sum(rewards[:span]) / len(rewards[:span]), sum(rewards[-span:]) / len(rewards[-span:])


def collect(root: Path) -> list[dict]:
    """One dict per finished run below ``root`` (a folder holding result.json), sorted by name."""
    rows = []
    for result in sorted(root.glob("*/result.json")):
        r = json.loads(result.read_text())
        r["method"] = result.parent.name
        r["reward_ends"] = reward_ends(result.parent / "run" / "metrics.jsonl")
        rows.append(r)
    protocols = {(r["eval_seed"], r["per_task"]) for r in rows}
    if len(protocols) > 1:
        raise SystemExit(f"{root}: runs scored on different (seed, samples per task): {sorted(protocols)}")
    return rows


def _cell(v: dict) -> str:
    return f"{v['change']:+.3f} ± {v['se']:.3f}"


def table(rows: list[dict]) -> str:
    tasks = [t for t in TASKS if any(t in r["tasks"] for r in rows)]
    head = ["method", "train wall", "rollouts or pairs seen", "train reward (first → last 8 steps)", *tasks,
            "overall (z)"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        first, last = r["reward_ends"]
        reward = "—" if first is None else f"{first:.3f} → {last:.3f}"
        o = r["overall"]
        overall = f"{o['delta']:+.3f} ± {o['se']:.3f}" + (f" ({o['delta'] / o['se']:+.1f})" if o["se"] else "")
        cells = [r["method"], f"{r['train_seconds'] / 60:.1f} min", str(r["trajectories_trained"]), reward,
                 *(_cell(r["tasks"][t]) if t in r["tasks"] else "—" for t in tasks),
                 overall]
        md.append("| " + " | ".join(cells) + " |")
    if rows:
        first = rows[0]
        md.append(f"\nHeld-out split, seed {first['eval_seed']}, {first['per_task']} paired samples per task, fp32.")
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="a folder of online_shapes.py runs (one subfolder each)")
    ap.add_argument("--out", default="", help="also write the table here")
    args = ap.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        raise SystemExit(f"root: {root} is not a folder")
    text = table(collect(root))
    if args.out:
        Path(args.out).write_text(text)
    sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()
