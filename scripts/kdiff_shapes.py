"""k-Diff on ShapesWorld pretraining (issue #25): a short run of each prediction target, side by side.

    python scripts/kdiff_shapes.py --out runs/kdiff [--steps 300] [--batch-size 16] [--threads 2]

Every run pretrains the ShapesWorld base architecture from scratch with the same seed, data stream, schedule
and loss space (k-Diff's v-space error, models/kdiff.py); only the network's output differs: ε (k = 0), v
(k = 1), x (k = 2), or k learned with the network from k = 1. Each run is judged on the same held-out
prompts and seeds (50 per task, fp32 sampling at the folder's guidance): GenEval-shapes (accuracy, SE) and FID
with ShapesWorld's feature net against as many exact renders of the held-out prompts. Writes
OUT/results.jsonl (a rerun skips finished variants) and OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

VARIANTS = {"eps (k=0)": (0.0, False), "v (k=1)": (1.0, False), "x (k=2)": (2.0, False),
            "learned k (from 1)": (1.0, True)}
FRESH_SEED, PER_TASK = 4321, 50


def run_variant(name: str, out: Path, args) -> dict:
    from visalign.demo import heldout_results, sampling_backbone
    from visalign.eval.commands import real_images
    from visalign.eval.fid import fid
    from visalign.eval.geneval import summarise
    from visalign.worlds.shapes.base import PretrainConfig, pretrain

    k, learn = VARIANTS[name]
    t0 = time.time()
    folder = out / "models" / name.split()[0]
    if not (folder / "visalign_parameterisation.json").exists():
        pretrain(PretrainConfig(steps=args.steps, batch_size=args.batch_size, bf16=False, threads=args.threads,
                                warmup_steps=max(1, args.steps // 10), save_every=args.steps, lr=args.lr,
                                prediction_type="k", k=k, learn_k=learn), folder, log_every=10)
    trained = time.time() - t0
    bb = sampling_backbone(str(folder), bf16=False)
    res = heldout_results(bb, per_task=args.per_task, seed=FRESH_SEED)
    fakes = torch.stack([r["image"] for r in res])  # [N, 3, H, W] in [0, 1]
    value = fid(real_images("shapes:eval", len(fakes), seed=FRESH_SEED + 1), fakes)
    s = summarise(res)
    final_k = json.loads((folder / "visalign_parameterisation.json").read_text())["k"]
    return {"variant": name, "k_start": k, "learned": learn, "k_final": final_k, "overall": s["overall"],
            "se": s.get("overall_se"), "tasks": {t: v["accuracy"] for t, v in s["tasks"].items()}, "fid": value,
            "n": len(res), "steps": args.steps, "batch_size": args.batch_size, "train_s": trained,
            "seconds": time.time() - t0}


def write_table(out: Path) -> str:
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    md = ["| target | k (start -> end) | GenEval-shapes (SE) | FID (shapes features) | train |",
          "|---|---|---|---|---|"]
    for r in rows:
        se = f" ± {r['se']:.3f}" if r.get("se") is not None else ""
        md.append(f"| {r['variant']} | {r['k_start']:.2f} -> {r['k_final']:.3f} | {r['overall']:.3f}{se} | "
                  f"{r['fid']:.2f} | {r['steps']} steps x {r['batch_size']}, {r['train_s'] / 60:.1f} min |")
    text = "\n".join(md) + "\n"
    (out / "table.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/kdiff")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--per-task", type=int, default=PER_TASK, help="held-out samples per GenEval task")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)

    from visalign.cli import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in VARIANTS:
            raise SystemExit(f"--variants: unknown {name!r}; expected some of: {', '.join(VARIANTS)}")
        done = {json.loads(x)["variant"] for x in results.read_text().splitlines()} if results.exists() else set()
        if name in done:
            continue
        row = run_variant(name, out, args)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: GenEval {row['overall']:.3f}, FID {row['fid']:.2f}, k {row['k_final']:.3f}", flush=True)
    print(write_table(out))


if __name__ == "__main__":
    main()
