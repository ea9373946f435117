"""The online levers' ablation on ShapesWorld: each recipe trained from the shipped base and scored on the online
protocol (held-out split, fresh seed, fp32, 200 paired samples per task), one table row each.

    python scripts/online_ablation.py --out runs/abl --run nft-faithful,odpo-faithful [--threads 1]
    python scripts/online_ablation.py --out runs/abl --table-only [--md docs-table.md]

A recipe is a config plus overrides (``RECIPES``); ``--run`` trains and scores the named ones that have no
result yet (through scripts/online_shapes.py), ``--table-only`` only reads OUT/*/. A row: the recipe, the lever
it turns, its wall time (training), the paired change per task and overall with SEs, the counting prompts'
over- and under-counts (base → tuned), and the change on training prompts where it was scored.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from online_shapes import miscounts  # noqa: E402

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
FAITHFUL = "objective.reward=faithful"
# name -> (lever, config, overrides); the first rows are each lever alone on a method's shipped recipe
RECIPES: dict[str, tuple[str, str, list[str]]] = {
    "nft": ("DiffusionNFT, shipped recipe (constraints reward)", "configs/shapes/nft.yaml", []),
    "nft-faithful": ("1: faithful reward (0.25 per unrequested object)", "configs/shapes/nft.yaml", [FAITHFUL]),
    "odpo-faithful": ("1: faithful reward", "configs/shapes/online_dpo.yaml", [FAITHFUL]),
    "odpo-faithful-count2": ("1 + 2: faithful, counting weighted 2x", "configs/shapes/online_dpo.yaml",
                             [FAITHFUL, "data.task_weights={counting: 2.0}"]),
    "nft-faithful-lr1e-3": ("1 + 4: faithful, lr 1e-3", "configs/shapes/nft.yaml", [FAITHFUL, "train.lr=1e-3"]),
    "nft-faithful-kl": ("1 + 3: faithful, KL 0.04", "configs/shapes/nft.yaml", [FAITHFUL, "objective.kl_coef=0.04"]),
    "grpo-faithful": ("1: faithful reward", "configs/shapes/grpo.yaml", [FAITHFUL]),
    "nft-faithful-lr3e-3": ("1 + 4: faithful, lr 3e-3", "configs/shapes/nft.yaml", [FAITHFUL, "train.lr=3e-3"]),
    "odpo-unreq0.1": ("1 + 9: constraints + 0.1 per unrequested object (an ensemble)",
                      "configs/shapes/online_dpo.yaml", ["objective.reward={constraints: 1.0, unrequested: 0.1}"]),
    "online-10steps-2x": ("7: the shipped recipe, twice the rollouts per round (64 prompts) sampled at 10 steps "
                          "(Flow-GRPO's shorter rollouts) in the same minutes", "configs/shapes/online.yaml",
                          ["objective.steps=10", "objective.prompts_per_round=64"]),
    "online-count2": ("2 + 9: the shipped recipe, counting prompts drawn twice as often (task-balanced rounds)",
                      "configs/shapes/online.yaml", ["data.task_weights={counting: 2.0}"]),
    "online-full": ("4: the shipped recipe, full fine-tuning instead of LoRA r8 (lr 5e-5, a tenth of the base's "
                    "pretraining lr)", "configs/shapes/online.yaml", ["lora.enabled=false", "train.lr=5e-5"]),
    "online-full-lr2e-5": ("4: the shipped recipe, full fine-tuning at lr 2e-5", "configs/shapes/online.yaml",
                           ["lora.enabled=false", "train.lr=2e-5"]),
    "online-r32": ("4: the shipped recipe, LoRA r32 instead of r8", "configs/shapes/online.yaml",
                   ["lora.rank=32", "lora.alpha=32.0"]),
    "online-fixedref": ("3: the shipped recipe, the reference held at the base (DPO's β·KL anchor) instead of "
                        "reset each round", "configs/shapes/online.yaml", ["objective.reset_reference=false"]),
    "grpo-unreq0.1-window": ("8 + 9: GRPO, noisy window (η on its 6 trained steps, the ODE elsewhere), "
                             "constraints + 0.1 per unrequested object", "configs/shapes/grpo.yaml",
                             ["objective.reward={constraints: 1.0, unrequested: 0.1}", "objective.noise=window"]),
}

# runs killed and resumed before the trainer kept a run's seconds across a resume (their summary's seconds are
# the resumed process's alone): what their wall cell covers
PARTIAL_WALL = {"online-10steps-2x": "steps 105-200 only: killed at 128, resumed from 104",
                "online-count2": "steps 153-200 only: killed at 168, resumed from 152"}


def run(out: Path, name: str, threads: int, seed: int, train_per_task: int) -> None:
    from online_shapes import main as online_main

    lever, config, overrides = RECIPES[name]
    online_main(["--out", str(out / name), "-c", config, "--seed", str(seed),
                 "--train-per-task", str(train_per_task), *overrides, f"train.threads={threads}"])


def row(folder: Path) -> dict | None:
    """A finished recipe's numbers, read from its files (result.json, the base's and its verdicts)."""
    result = folder / "result.json"
    if not result.exists():
        return None
    r = json.loads(result.read_text())
    base_file = folder.parent / f"base-shapes-base-seed{r['eval_seed']}-n{r['per_task']}.jsonl"
    read = lambda f: [json.loads(x) for x in f.read_text().splitlines()]  # noqa: E731
    r["miscounts"] = {"base": miscounts(read(base_file)), "tuned": miscounts(read(folder / "tuned.jsonl"))}
    r["name"] = folder.name
    r["lever"] = RECIPES.get(folder.name, ("(not in RECIPES)",))[0]
    return r


def _cell(v: dict) -> str:
    return f"{v['change']:+.3f} ± {v['se']:.3f}"


def _wall(r: dict) -> str:
    wall = f"{r['train_seconds'] / 60:.1f} min"
    return f"{wall} ({PARTIAL_WALL[r['name']]})" if r["name"] in PARTIAL_WALL else wall


def table(rows: list[dict]) -> str:
    head = ["recipe", "lever", "train wall", *TASKS, "overall (z)", "counting over / under (base → tuned)",
            "training prompts: overall"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        o, m = r["overall"], r["miscounts"]
        z = o["delta"] / o["se"] if o["se"] else float("nan")
        train = r.get("train_prompts", {}).get("overall")
        md.append("| " + " | ".join([
            r["name"], r["lever"], _wall(r),
            *(_cell(r["tasks"][t]) for t in TASKS), f"{o['delta']:+.3f} ± {o['se']:.3f} ({z:+.1f})",
            f"{m['base']['over']} / {m['base']['under']} → {m['tuned']['over']} / {m['tuned']['under']}",
            f"{train['delta']:+.3f} ± {train['se']:.3f}" if train else "—"]) + " |")
    seeds = sorted({(r["eval_seed"], r["per_task"]) for r in rows})
    md.append(f"\nHeld-out split, paired against the base, fp32; (seed, samples per task): {seeds}.")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/abl")
    ap.add_argument("--run", default="", help="comma-separated recipe names to train and score")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--train-per-task", type=int, default=0)
    ap.add_argument("--md", default="")
    args = ap.parse_args(argv)
    out = Path(args.out)
    unknown = [n for n in args.run.split(",") if n and n not in RECIPES]
    if unknown:
        raise SystemExit(f"--run: unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    if not args.table_only:
        for name in filter(None, args.run.split(",")):
            run(out, name, args.threads, args.seed, args.train_per_task)
    rows = [r for r in (row(f) for f in sorted(out.iterdir()) if f.is_dir()) if r] if out.exists() else []
    text = table(rows)
    if args.md:
        Path(args.md).write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
