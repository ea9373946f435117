"""Probe a trained adapter on the ShapesWorld base: GenEval-shapes paired against the base, like the demo.

Evaluates like the demo (50 samples per task, the demo's seeds) on held-out or training prompts, optionally
with the unconditional branch of classifier-free guidance taken from the reference (adapters off).

    python scripts/probe_finetune.py --eval-only runs/probe/dpo/lora --uncond reference
    python scripts/probe_finetune.py --eval-only runs/demo/run/lora --random-adapter 0   # the control

(Its earlier private training loop on fresh contrast pairs, whose findings are in docs/experiments.md, was
removed in the house redesign: train through `visalign finetune`, then probe the adapter here.)

``--random-adapter SEED`` is the control for any trained adapter: each LoRA B matrix is replaced by a
random one of the same norm, so the update has the trained one's size but no learned direction.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def randomise_adapter(module: torch.nn.Module, seed: int) -> int:
    """Replace every LoRA B matrix by a Gaussian one of the same Frobenius norm; returns how many."""
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                r = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                p.copy_((r * (p.float().norm() / r.norm())).to(p.dtype))
                n += 1
    return n


def evaluate(base: str, lora: Path | None, split: str, uncond: str, per_task: int = 50,
             random_adapter: int | None = None) -> list[dict]:
    from visalign.demo import heldout_results, sampling_backbone

    bb = sampling_backbone(base, lora)
    if random_adapter is not None:
        if lora is None or not randomise_adapter(bb.unwrapped(), random_adapter):
            raise SystemExit("--random-adapter needs an adapter: pass --eval-only LORA_FOLDER")
    if uncond == "reference":
        def guided(x, t, cond, uncond_cond, guidance):
            t = t.expand(x.shape[0]) if t.ndim == 0 else t
            c = bb.predict(x, t, cond)
            with bb.reference():
                u = bb.predict(x, t, uncond_cond)
            return u + guidance * (c - u)

        bb.guided = guided
    return [{k: v for k, v in r.items() if k != "image"} for r in heldout_results(bb, per_task, split=split)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="assets/shapes-base")
    ap.add_argument("--out", default="runs/probe")
    ap.add_argument("--eval-split", choices=("eval", "train"), default="eval")
    ap.add_argument("--uncond", choices=("policy", "reference"), default="policy")
    ap.add_argument("--eval-only", "--lora", dest="eval_only", required=True, help="the LoRA folder to probe")
    ap.add_argument("--eval-per-task", type=int, default=50)
    ap.add_argument("--random-adapter", type=int, default=None, metavar="SEED",
                    help="with --eval-only: score a random adapter of the same per-matrix norm (the control)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from visalign.cli import quiet_libraries
    from visalign.demo import paired_improvement
    from visalign.eval.geneval import summarise
    from visalign.registry import load_all

    quiet_libraries()
    load_all()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lora = Path(args.eval_only)
    base_file = out / f"base_{args.eval_split}_{args.eval_per_task}.jsonl"
    if not base_file.exists():
        base_rows = evaluate(args.base, None, args.eval_split, "policy", args.eval_per_task)
        base_file.write_text("".join(json.dumps(r) + "\n" for r in base_rows))
    base = [json.loads(x) for x in base_file.read_text().splitlines()]
    tuned = evaluate(args.base, lora, args.eval_split, args.uncond, args.eval_per_task, args.random_adapter)
    s = summarise(tuned)
    report = {"lora": str(lora), "split": args.eval_split, "uncond": args.uncond, "random_adapter": args.random_adapter,
              "base_overall": summarise(base)["overall"], "overall": s["overall"],
              "tasks": {k: v["accuracy"] for k, v in s["tasks"].items()},
              "change": paired_improvement(base, tuned), "args": vars(args)}
    with open(out / "probe.jsonl", "a") as f:
        f.write(json.dumps(report) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
