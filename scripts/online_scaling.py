"""The online scaling curve: GenEval-shapes gain against training length, from one long run's checkpoints,
on several fresh seed sets, each paired against the base (same prompts and seeds, fp32 sampling).

    python scripts/online_scaling.py RUN --out OUT --steps 200 400 600 720 --seeds 4321 8765
        [--per-task 200] [--base assets/shapes-base] [--base-cache runs/online] [--table-only]

RUN is a finetune run of an online method with LoRA checkpoints (``train.save_every``: each checkpoint holds
step-N/lora); the run's last step is its final ``lora``. Per (step, seed) the tuned verdicts go to
OUT/tuned-stepN-seedS.jsonl (computed once, reused after), the base's to BASE_CACHE/base-NAME-seedS-nN.jsonl
(the file `scripts/online_shapes.py` shares). Several invocations with disjoint steps or seeds can run side
by side. OUT/scaling.json and OUT/scaling.md hold, per step: the rollouts sampled and updates' samples so
far, the wall clock at the checkpoint, and the paired change per seed set and pooled over them, per task.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from online_shapes import evaluate  # noqa: E402
from online_table import TASKS  # noqa: E402


def checkpoint_lora(run: Path, step: int) -> tuple[Path, Path]:
    """(the adapter after ``step`` updates, a file written when it was saved): a checkpoint's or the end's."""
    summary = run / "summary.json"
    if summary.exists() and json.loads(summary.read_text())["steps"] == step:
        return run / "lora", summary
    ckpt = run / "checkpoints" / f"step-{step:07d}"
    if not (ckpt / "lora").is_dir():
        raise SystemExit(f"{ckpt}/lora: no adapter saved at step {step} (a LoRA run with train.save_every "
                         f"dividing {step}, or its last step)")
    return ckpt / "lora", ckpt / "visalign_state.json"


def rollouts_sampled(objective: dict, step: int) -> int:
    """Rollouts the run had sampled by ``step``: one round of prompts x (group or K) every round_steps."""
    per_prompt = objective.get("group_size") or objective.get("samples_per_prompt") or 1
    return math.ceil(step / objective["round_steps"]) * objective["prompts_per_round"] * per_prompt


def pooled(results: list[tuple[list[dict], list[dict]]]) -> dict:
    """The paired change over several seed sets at once: each set's rows keyed apart by its seed."""
    from visalign.eval.stats import paired_by_task

    base, tuned = [], []
    for i, (b, t) in enumerate(results):
        base += [r | {"prompt_index": f"{i}:{r['prompt_index']}"} for r in b]
        tuned += [r | {"prompt_index": f"{i}:{r['prompt_index']}"} for r in t]
    return paired_by_task(base, tuned)


def point(run: Path, out: Path, step: int, seeds: list[int], args, objective: dict) -> dict:
    lora, stamp = checkpoint_lora(run, step)
    files = [(args.base_cache / f"base-{Path(args.base).name}-seed{s}-n{args.per_task}.jsonl",
              out / f"tuned-step{step}-seed{s}.jsonl", s) for s in seeds]
    if args.table_only and not all(b.exists() and t.exists() for b, t, _ in files):
        return {}
    per_seed = [(evaluate(args.base, None, args.per_task, s, b), evaluate(args.base, str(lora), args.per_task, s, t))
                for b, t, s in files]
    from visalign.eval.stats import paired_by_task

    return {"step": step, "rollouts": rollouts_sampled(objective, step),
            "samples_trained": step * args.batch_size,
            "wall_minutes": (stamp.stat().st_mtime - (run / "config.yaml").stat().st_mtime) / 60,
            "seeds": {str(s): paired_by_task(b, t) for s, (b, t) in zip(seeds, per_seed)},
            "pooled": pooled(per_seed)}


def _cell(v: dict) -> str:
    return f"{v.get('change', v.get('delta')):+.3f} ± {v['se']:.3f}"


def table(points: list[dict], seeds: list[int], per_task: int) -> str:
    head = ["step", "wall", "rollouts sampled", *(f"seed {s}" for s in seeds), "pooled (z)", *TASKS]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        o = p["pooled"]["overall"]
        z = o["delta"] / o["se"] if o["se"] else float("nan")
        md.append("| " + " | ".join([str(p["step"]), f"{p['wall_minutes']:.0f} min", str(p["rollouts"]),
                                     *(_cell(p["seeds"][str(s)]["overall"]) for s in seeds),
                                     f"{_cell(o)} ({z:+.1f})",
                                     *(_cell(p["pooled"]["tasks"][t]) for t in TASKS)]) + " |")
    md.append(f"\nHeld-out split, {6 * per_task} paired fp32 samples per seed set (tasks pooled over the sets).")
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, nargs="+", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[4321, 8765])
    ap.add_argument("--per-task", type=int, default=200)
    ap.add_argument("--base", default="assets/shapes-base")
    ap.add_argument("--base-cache", type=Path, help="folder of shared base verdicts (default: OUT's parent)")
    ap.add_argument("--table-only", action="store_true", help="tabulate the points already scored, sample nothing")
    args = ap.parse_args(argv)
    args.base_cache = args.base_cache or args.out.parent
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((args.run / "config.yaml").read_text())
    objective, args.batch_size = cfg["objective"], cfg["train"]["batch_size"]
    points = [p for p in (point(args.run, args.out, s, args.seeds, args, objective) for s in args.steps) if p]
    for name, text in (("scaling.json", json.dumps(points, indent=2)),
                       ("scaling.md", table(points, args.seeds, args.per_task))):
        tmp = args.out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out / name)
    print(table(points, args.seeds, args.per_task))
    return points


if __name__ == "__main__":
    main()
