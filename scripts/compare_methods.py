"""Every method (and the main heads) on ShapesWorld from the shipped base, one budget and seed each.

    python scripts/compare_methods.py --out runs/compare [--steps 200] [--methods dpo,ipo,...]
    python scripts/compare_methods.py --experiment robustness --out runs/robust

Writes OUT/results.jsonl (one row per finished method; a rerun skips finished ones) and OUT/table.md:
GenEval-shapes overall and per task with SE, ShapesWorld FID, steps, pairs or samples seen, wall time.
The robustness experiment flips 30% of the pair labels and compares DPO, rDPO (eps = 0.3) and cDPO.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

METHODS = {
    "base": None,
    "dpo": ["objective=diffusion_dpo"],
    "dpo-hinge": ["objective=diffusion_dpo", "objective.head=hinge"],
    "dpo-ipo": ["objective=diffusion_dpo", "objective.head=ipo", "objective.head.tau=0.5"],
    "kto": ["objective=kto"],
    "mapo": ["objective=mapo", "train.lr=1e-4"],
    "rankdpo": ["objective=rankdpo", "data.format=lists"],
    "inpo": ["objective=inpo", "objective.steps=10"],
    "smpo": ["objective=smpo", "objective.steps=5"],
    "d3po": ["objective=d3po", "objective.reward=shapes", "objective.steps=10", "data.path=shapes:train"],
    "ddo": ["objective=ddo", "objective.beta=1000", "data.path=shapes:train"],
}
ROBUST = {"dpo (30% flipped)": ["objective=diffusion_dpo"],
          "rdpo eps=0.3": ["objective=diffusion_dpo", "objective.head=robust", "objective.head.eps=0.3"],
          "cdpo eps=0.3": ["objective=diffusion_dpo", "objective.head=conservative", "objective.head.eps=0.3"]}


def build_data(out: Path, base: str, images_per_prompt: int, steps: int) -> Path:
    from visalign.data.make_dataset import MakeDatasetConfig, make_dataset

    make_dataset(MakeDatasetConfig(prompts="shapes:train", models=[f"pixel={base}"], rewards=["shapes"],
                                   images_per_prompt=images_per_prompt, out=str(out), steps=steps,
                                   pairs="best-worst", batch_size=64))
    return out


def flip_labels(src: Path, dst: Path, rate: float, seed: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r for f in sorted(src.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    rng = random.Random(seed)
    flipped = 0
    for r in rows:
        if rng.random() < rate:
            r["label_0"] = 1.0 - r["label_0"]
            flipped += 1
    dst.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), dst / "pairs-flipped.parquet")
    (dst / "flipped.json").write_text(json.dumps({"rate": rate, "flipped": flipped, "rows": len(rows)}))
    return dst


def evaluate(base: str, run: Path | None, samples: int, seed: int, fid_n: int) -> dict:
    from visalign.config import Component
    from visalign.eval.fid import fid
    from visalign.eval.geneval import generate_and_score, summarise
    from visalign.models.lora import load_lora
    from visalign.train.setup import build_backbone
    from visalign.worlds.shapes.render import prompt_records

    bb = build_backbone(Component("pixel", {"path": base}))
    if run is not None:
        load_lora(bb, run / "lora")
    bb.unwrapped().eval()
    records = prompt_records("eval")
    with torch.no_grad():
        res = generate_and_score(bb, records, samples, seed=seed)
    metrics = summarise(res)
    from visalign.eval.commands import real_images as renders  # as `visalign eval fid --real shapes:eval`

    fakes = torch.stack([r["image"] for r in res])[:fid_n]
    metrics["fid"] = fid(renders("shapes:eval", len(fakes), seed=seed + 1), fakes)
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--experiment", choices=("compare", "robustness"), default="compare")
    ap.add_argument("--base", default="assets/shapes-base")
    ap.add_argument("--methods", default="", help="comma-separated subset")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--samples", type=int, default=4, help="eval samples per held-out prompt")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from visalign.cli import _quiet_libraries
    from visalign.config import load_config
    from visalign.eval.geneval import format_table
    from visalign.train.loop import train
    from visalign.train.setup import resolve_path

    _quiet_libraries()
    out = Path(args.out)
    base = resolve_path(args.base)
    data = out / "data"
    if not (data / "provenance.json").exists() or not list(data.glob("data-*.parquet")):
        build_data(data, base, 4, 20)
    table = METHODS if args.experiment == "compare" else ROBUST
    pairs = data / "pairs" if args.experiment == "compare" else flip_labels(data / "pairs", out / "flipped", 0.3)
    chosen = [m for m in table if not args.methods or m in args.methods.split(",")]
    results_file = out / "results.jsonl"
    done = {json.loads(x)["method"] for x in results_file.read_text().splitlines()} if results_file.exists() else set()
    for name in chosen:
        if name in done:
            continue
        t0 = time.time()
        summary, run = {"steps": 0, "pairs_seen": 0}, None
        if table[name] is not None:
            run = out / "runs" / name.replace(" ", "_").replace("=", "")
            over = [f"model.path={base}", f"data.path={pairs}", f"train.output_dir={run}", f"train.steps={args.steps}",
                    f"train.batch_size={args.batch_size}", f"train.lr={args.lr}", f"train.seed={args.seed}",
                    "train.save_every=0", "train.warmup_steps=10", *table[name]]
            summary = train(load_config("shapes", [], over))
        metrics = evaluate(base, run, args.samples, 1234, 2000)
        row = {"method": name, "overrides": table[name], **metrics, "steps": summary["steps"],
               "pairs_seen": summary["pairs_seen"], "seconds": time.time() - t0}
        with open(results_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: overall {metrics['overall']:.3f} ± {metrics['overall_se']:.3f}, FID {metrics['fid']:.2f}")
    rows = {json.loads(x)["method"]: json.loads(x) for x in results_file.read_text().splitlines()}
    md = format_table(rows).splitlines()
    md[0] += " FID (shapes) | steps | pairs/samples seen | wall time |"
    md[1] += "---|---|---|---|"
    for i, r in enumerate(rows.values()):
        md[2 + i] += f" {r['fid']:.2f} | {r['steps']} | {r['pairs_seen']} | {r['seconds'] / 60:.1f} min |"
    cmd = f"python scripts/compare_methods.py --experiment {args.experiment} --out {args.out} --steps {args.steps}"
    (out / "table.md").write_text("\n".join(md) + f"\n\nReproduce: `{cmd}`\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
