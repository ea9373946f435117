"""Every method (and the main heads) on ShapesWorld from the shipped base, one budget and seed each.

    python scripts/compare_methods.py --out runs/compare [--steps 200] [--methods dpo,ipo,...] [--threads 2]
    python scripts/compare_methods.py --experiment robustness --out runs/robust

Data: the `make demo` recipe (40 training prompts per task x 4 base samples scored by the `shapes`
reward; every pair differing by >= 0.15 in reward; the ranked lists for RankDPO). Online methods
(D3PO, DDO) sample their own data from the training prompts. Every model is evaluated like the demo:
GenEval-shapes on 50 held-out samples per task (same seeds for every model, bf16 sampling, 20 DDIM
steps, the demo's guidance), the change against the base with a paired standard error, and ShapesWorld FID
against held-out renders. Writes OUT/results.jsonl (one row per finished method; a rerun skips
finished ones, so several processes can split the methods) and OUT/table.md. The robustness
experiment flips 30% of the pair labels and compares DPO, rDPO (eps = 0.3) and cDPO.
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
    "inpo-policy": ["objective=inpo", "objective.steps=10"],
    "inpo-cached": ["objective=inpo", "objective.steps=10", "objective.inversion_model=reference",
                    "objective.cache_inversions=true", "objective.eta=0"],
    "smpo": ["objective=smpo", "objective.steps=5", "objective.inversion_model=reference",
             "objective.cache_inversions=true"],
    "d3po": ["objective=d3po", "objective.reward=shapes", "objective.steps=10", "objective.timestep_fraction=0.2",
             "data.path=shapes:train"],
    "ddo": ["objective=ddo", "objective.beta=1000", "data.path=shapes:train"],
}
ROBUST = {"base": None,
          "dpo (clean labels)": ["objective=diffusion_dpo"],
          "dpo (30% flipped)": ["objective=diffusion_dpo", "flipped"],
          "rdpo eps=0.3": ["objective=diffusion_dpo", "objective.head=robust", "objective.head.eps=0.3", "flipped"],
          "cdpo eps=0.3": ["objective=diffusion_dpo", "objective.head=conservative", "objective.head.eps=0.3",
                           "flipped"]}
EVAL_PER_TASK = 50


def flip_labels(src: Path, dst: Path, rate: float, seed: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (dst / "flipped.json").exists():
        return dst
    rows = pair_rows(src)
    rng = random.Random(seed)
    flipped = []
    for i, r in enumerate(rows):
        if rng.random() < rate:
            r["label_0"] = 1.0 - r["label_0"]
            flipped.append(i)
    dst.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), dst / "pairs-flipped.parquet")
    (dst / "flipped.json").write_text(json.dumps({"rate": rate, "flipped": len(flipped), "rows": len(rows),
                                                  "indices": flipped}))
    return dst


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def pair_rows(src: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [r for f in sorted(src.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def true_label_accuracy(base: str, summary: dict, clean_pairs: Path, flipped: Path) -> dict:
    """Implicit accuracy of the tuned model on the TRUE labels of the training pairs, split into the pairs
    whose label was flipped (a model that fits the noise ranks these wrong) and the untouched ones."""
    from visalign.data.pairs import decode_image, prepare_image
    from visalign.demo import sampling_backbone
    from visalign.eval.implicit_accuracy import implicit_accuracy

    rows = pair_rows(clean_pairs)  # label_0 = 1: image 0 is the true winner
    idx = set(json.loads((flipped / "flipped.json").read_text())["indices"])
    bb = sampling_backbone(summary.get("model", base), summary.get("lora"), bf16=False)

    def image(png: bytes) -> torch.Tensor:
        return prepare_image(decode_image(png), bb.resolution).tensor

    out = {}
    for name, keep in (("flipped", lambda i: i in idx), ("unflipped", lambda i: i not in idx)):
        pairs = [(r["caption"], image(r["jpg_0"]), image(r["jpg_1"])) for i, r in enumerate(rows) if keep(i)]
        out[name] = implicit_accuracy(bb, pairs, draws=4)
    return out


def evaluate(base: str, summary: dict) -> tuple[dict, list[dict]]:
    """The demo's held-out GenEval-shapes evaluation plus ShapesWorld FID against held-out renders."""
    from visalign.demo import EVAL_SEED, generate_heldout
    from visalign.eval.commands import real_images
    from visalign.eval.fid import fid
    from visalign.eval.geneval import summarise

    _, res = generate_heldout(summary.get("model", base), summary.get("lora"), per_task=EVAL_PER_TASK)
    metrics = summarise(res)
    fakes = torch.stack([r["image"] for r in res])
    metrics["fid"] = fid(real_images("shapes:eval", len(fakes), seed=EVAL_SEED + 1), fakes)
    return metrics, [{k: v for k, v in r.items() if k != "image"} for r in res]


def write_table(out: Path, experiment: str, steps: int) -> str:
    from visalign.eval.geneval import format_table

    rows = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["method"]] = r
    order = list(METHODS if experiment == "compare" else ROBUST)
    rows = {k: rows[k] for k in sorted(rows, key=lambda m: order.index(m) if m in order else len(order))}
    md = format_table(rows).splitlines()
    md[0] += " change vs base (paired SE) | FID (shapes) | steps | pairs/samples seen | wall time |"
    md[1] += "---|---|---|---|---|"
    robust = experiment == "robustness"
    if robust:
        md[0] += " implicit acc., true labels: flipped pairs | unflipped pairs |"
        md[1] += "---|---|"
    for i, r in enumerate(rows.values()):
        imp = r.get("vs_base")
        change = "—" if imp is None else f"{imp['delta']:+.3f} ± {imp['se']:.3f} ({imp['z']:+.1f} SE)"
        md[2 + i] += (f" {change} | {r['fid']:.1f} | {r['steps']} | {r['pairs_seen']} | "
                      f"{r['seconds'] / 60:.1f} min |")
        if robust:
            acc = r.get("true_label_acc")
            md[2 + i] += " — | — |" if acc is None else "".join(
                f" {acc[k]['accuracy']:.3f} ± {acc[k].get('se_by_prompt', acc[k]['se']):.3f} (n={acc[k]['n']}) |"
                for k in ("flipped", "unflipped"))  # SE clustered by prompt: a prompt's pairs share images
    cmd = f"python scripts/compare_methods.py --experiment {experiment} --out {out} --steps {steps}"
    text = "\n".join(md) + f"\n\nReproduce: `{cmd}`\n"
    (out / "table.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--experiment", choices=("compare", "robustness"), default="compare")
    ap.add_argument("--base", default="assets/shapes-base")
    ap.add_argument("--data", default="", help="a make-dataset folder to reuse (default: OUT/data, built once)")
    ap.add_argument("--methods", default="", help="comma-separated subset of: " + ", ".join(METHODS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()

    from visalign.cli import quiet_libraries
    from visalign.config import load_config
    from visalign.demo import paired_improvement
    from visalign.models.load import resolve_path
    from visalign.train.loop import train

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        print(write_table(out, args.experiment, args.steps))
        return
    table = METHODS if args.experiment == "compare" else ROBUST
    asked = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in asked if m not in table]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; expected some of: {', '.join(table)}")
    base = resolve_path(args.base)
    data = Path(args.data) if args.data else out / "data"
    if not (data / "provenance.json").exists():
        from visalign.demo import build_demo_data

        build_demo_data(data, base, threads=args.threads, progress=False)
    flipped = flip_labels(data / "pairs", out / "flipped", 0.3) if args.experiment == "robustness" else None
    chosen = [m for m in table if not asked or m in asked]
    results_file = out / "results.jsonl"
    base_file = out / "base_results.jsonl"
    for name in chosen:
        done = {json.loads(x)["method"] for x in results_file.read_text().splitlines()} if results_file.exists() else ()
        if name in done:
            continue
        t0 = time.time()
        summary: dict = {"steps": 0, "pairs_seen": 0}
        over = table[name]
        if over is not None:
            run = out / "runs" / slug(name)
            pairs = flipped if "flipped" in over else data / ("." if "data.format=lists" in over else "pairs")
            settings = [f"model.path={base}", f"data.path={pairs}", f"train.output_dir={run}",
                        f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}",
                        f"train.seed={args.seed}",
                        "train.save_every=0", "train.warmup_steps=10", "train.mixed_precision=bf16",
                        f"train.threads={args.threads}", *[o for o in over if o != "flipped"]]
            summary = train(load_config("shapes", [], settings))
        metrics, per_image = evaluate(base, summary)
        if flipped is not None and over is not None:
            metrics["true_label_acc"] = true_label_accuracy(base, summary, data / "pairs", flipped)
        per_image_file = out / "per_image" / f"{slug(name)}.jsonl"
        per_image_file.parent.mkdir(exist_ok=True)
        per_image_file.write_text("".join(json.dumps(r) + "\n" for r in per_image))
        if over is None:
            base_file.write_text("".join(json.dumps(r) + "\n" for r in per_image))
        elif base_file.exists():
            metrics["vs_base"] = paired_improvement([json.loads(x) for x in base_file.read_text().splitlines()],
                                                    per_image)
        row = {"method": name, "overrides": over, **metrics, "steps": summary["steps"],
               "pairs_seen": summary["pairs_seen"], "seconds": time.time() - t0}
        with open(results_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: overall {metrics['overall']:.3f} ± {metrics['overall_se']:.3f}, FID {metrics['fid']:.1f}",
              flush=True)
    print(write_table(out, args.experiment, args.steps))


if __name__ == "__main__":
    main()
