"""Diagnose why fine-tuning the ShapesWorld base does not raise its GenEval-shapes score.

Trains a LoRA on fresh ShapesWorld contrast pairs every step (a correct render against the same scene
with one attribute wrong: the cleanest preference signal there is, and unlimited), with Diffusion-DPO
or with plain SFT on the correct renders (the pretraining objective on ground truth), then evaluates
like the demo (50 samples per task, the demo's seeds) on held-out or training prompts, optionally with
the unconditional branch of classifier-free guidance taken from the reference (adapters off).

    python scripts/probe_finetune.py --loss dpo --lr 3e-4 --steps 300 --out runs/probe/dpo
    python scripts/probe_finetune.py --loss sft --lr 5e-4 --eval-split train --out runs/probe/sft
    python scripts/probe_finetune.py --eval-only runs/probe/dpo/lora --uncond reference
    python scripts/probe_finetune.py --eval-only runs/demo/run/lora --random-adapter 0   # the control

``--random-adapter SEED`` is the control for any trained adapter: each LoRA B matrix is replaced by a
random one of the same norm, so the update has the trained one's size but no learned direction.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch


def contrast_batch(step: int, batch_size: int, by_task: dict[str, list[dict]]) -> tuple[list[str], torch.Tensor]:
    """``batch_size`` contrast pairs, tasks uniform, fixed by ``step``: (prompts, images [B, 2, 3, H, W] in [0, 1])."""
    from visalign.worlds.shapes.contrast import contrast_pair

    rng = random.Random(step)
    tasks = sorted(by_task)
    records = [rng.choice(by_task[rng.choice(tasks)]) for _ in range(batch_size)]
    pairs = [np.stack(contrast_pair(r, rng.randrange(2**31))) for r in records]
    return [r["prompt"] for r in records], torch.from_numpy(np.stack(pairs)).permute(0, 1, 4, 2, 3).float() / 255.0


def train_lora(args, base: str) -> Path:
    from visalign.config import Component
    from visalign.models.lora import LoraSpec, add_lora, save_lora
    from visalign.objectives.base import model_inputs
    from visalign.objectives.diffusion_dpo import DiffusionDPO
    from visalign.train.setup import build_backbone
    from visalign.types import PreferenceBatch
    from visalign.worlds.shapes.render import prompt_records

    by_task: dict[str, list[dict]] = {}
    for r in prompt_records("train"):
        by_task.setdefault(r["tag"], []).append(r)
    bb = build_backbone(Component("pixel", {"path": base}))
    add_lora(bb, LoraSpec(rank=args.rank, alpha=args.rank))
    if args.tmin:  # restrict training timesteps to [tmin, T): where layout and attributes are decided
        bb.sample_timesteps = lambda n, generator=None: torch.randint(args.tmin, bb.num_train_timesteps, (n,),
                                                                      generator=generator)
    params = [p for p in bb.unwrapped().parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    dpo = DiffusionDPO(beta=args.beta)
    bb.unwrapped().train()
    torch.manual_seed(args.seed)
    t0, window = time.time(), []
    for step in range(args.steps):
        prompts, images = contrast_batch(args.seed * 1_000_003 + step, args.batch_size, by_task)
        batch = PreferenceBatch(prompts=prompts, label=torch.ones(len(prompts)), images=images)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 10)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if args.loss == "sft":
                x0, cond = model_inputs(bb, batch)
                loss, acc = bb.error(bb.noise(x0[:, 0]), cond).mean(), float("nan")
            else:
                res = dpo(bb, batch)
                loss, acc = res.loss, res.metrics["implicit_acc"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        window.append((float(loss.detach()), acc))
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: loss {np.mean([w[0] for w in window]):.4f}, implicit accuracy on fresh pairs "
                  f"{np.mean([w[1] for w in window]):.2f} ({time.time() - t0:.0f}s)", flush=True)
            window = []
    return save_lora(bb, Path(args.out) / "lora").parent


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
    ap.add_argument("--loss", choices=("dpo", "sft"), default="dpo")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--beta", type=float, default=5000.0)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tmin", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-split", choices=("eval", "train"), default="eval")
    ap.add_argument("--uncond", choices=("policy", "reference"), default="policy")
    ap.add_argument("--eval-only", default="", help="evaluate this LoRA folder instead of training one")
    ap.add_argument("--eval-per-task", type=int, default=50)
    ap.add_argument("--random-adapter", type=int, default=None, metavar="SEED",
                    help="with --eval-only: score a random adapter of the same per-matrix norm (the control)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from visalign.cli import _quiet_libraries
    from visalign.demo import paired_improvement
    from visalign.eval.geneval import summarise
    from visalign.registry import load_all

    _quiet_libraries()
    load_all()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lora = Path(args.eval_only) if args.eval_only else train_lora(args, args.base)
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
