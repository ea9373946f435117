"""Every method on the rater's data, judged by the rater's win rate on held-out prompts (issue #24).

    python scripts/compare_rater.py --out runs/rater [--methods dpo,kto,...] [--threads 2]
    python scripts/compare_rater.py --experiment noise --out runs/rater-noise --data runs/rater/data

Data: the `make demo` recipe (40 training prompts per task x 4 base samples scored by the `rater`; every
pair at least 0.05 apart; the ranked lists for list methods). Training: the demo's budget (200 steps of 16
pairs, LoRA r8, lr 3e-4, fp32 unless the row says bf16: bf16 autocast is emulated, about 17x slower,
on CPUs without AMX/AVX512-BF16). Evaluation: 50 held-out prompts per task,
*fresh* seeds (not the demo's), sampled in fp32, the same seeds for base and tuned model: the rater's
win rate over the base (ties half, 95% interval, z against 50%), each taste term's paired change, and
GenEval-shapes' paired change. Writes OUT/results.jsonl (a rerun skips finished rows) and OUT/table.md.

The noise experiment trains DPO, rDPO and cDPO on the same pairs with (a) 30% of labels flipped and (b)
labels drawn like a person's: Bradley-Terry on the rater's score gap at the temperature whose agreement
with the noiseless taste is Pick-a-Pic's 0.68; rDPO/cDPO get eps = the expected flip rate.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from compare_methods import flip_labels, pair_rows, slug, true_label_accuracy

FRESH_SEED, PER_TASK = 4321, 50
D3PO = ["objective=d3po", "objective.reward=rater", "objective.min_margin=0.05", "objective.steps=10",
        "objective.timestep_fraction=0.2", "data.path=shapes:train"]
METHODS = {
    "base": None,
    "dpo": ["objective=diffusion_dpo"],
    "kto": ["objective=kto"],
    "rankdpo": ["objective=rankdpo", "data.format=lists"],
    "dpo-ipo": ["objective=diffusion_dpo", "objective.head=ipo", "objective.head.tau=0.5"],
    "dpo-hinge": ["objective=diffusion_dpo", "objective.head=hinge"],
    "mapo": ["objective=mapo", "train.lr=1e-4"],
    "smpo": ["objective=smpo", "objective.steps=5", "objective.inversion_model=reference",
             "objective.cache_inversions=true"],
    "inpo": ["objective=inpo", "objective.steps=10", "objective.inversion_model=reference",
             "objective.cache_inversions=true", "objective.eta=0"],
    "d3po": D3PO,
    "ddo": ["objective=ddo", "objective.beta=1000", "data.path=shapes:train"],
    "dpo-fdpo-js": ["objective=diffusion_dpo", "objective.head=fdpo", "objective.head.divergence=js"],
    "dpo-fdpo-forward_kl": ["objective=diffusion_dpo", "objective.head=fdpo", "objective.head.divergence=forward_kl"],
    "dpo-fdpo-alpha0.5": ["objective=diffusion_dpo", "objective.head=fdpo", "objective.head.divergence=alpha",
                          "objective.head.alpha=0.5"],
    "dpo-adpo": ["objective=diffusion_dpo", "objective.head=adpo"],
    "rankdpo-adpo": ["objective=rankdpo", "data.format=lists", "objective.head=adpo"],
    "dpo-beta": ["objective=diffusion_dpo", "objective.head=beta_dpo"],
    "curry-dpo (3 stages)": ["objective=diffusion_dpo", "data.curriculum=true", "data.curriculum_stages=3"],
    "dpo (full fine-tune, adamw)": ["objective=diffusion_dpo", "lora.enabled=false", "train.lr=3e-5"],
    "dpo (full fine-tune, dct_adamw r32)": ["objective=diffusion_dpo", "lora.enabled=false", "train.lr=3e-5",
                                            "train.optimizer=dct_adamw", "train.optimizer_rank=32"],
    "dpo (bf16 training)": ["objective=diffusion_dpo", "train.mixed_precision=bf16"],
}
NOISE = {
    "base": None,
    "dpo (clean labels)": ["objective=diffusion_dpo"],
    "dpo (30% flipped)": ["objective=diffusion_dpo", "@flipped"],
    "rdpo eps=0.3 (30% flipped)": ["objective=diffusion_dpo", "objective.head=robust", "objective.head.eps=0.3",
                                   "@flipped"],
    "cdpo eps=0.3 (30% flipped)": ["objective=diffusion_dpo", "objective.head=conservative",
                                   "objective.head.eps=0.3", "@flipped"],
    "dpo (rater BT noise)": ["objective=diffusion_dpo", "@bt"],
    "rdpo (rater BT noise)": ["objective=diffusion_dpo", "objective.head=robust", "objective.head.eps=@rate", "@bt"],
    "cdpo (rater BT noise)": ["objective=diffusion_dpo", "objective.head=conservative", "objective.head.eps=@rate",
                              "@bt"],
}


def bt_relabel(src: Path, dst: Path, seed: int = 0) -> tuple[Path, float]:
    """The pairs relabelled like a person: label_0 ~ Bernoulli(σ((s0 − s1)/T)), T for Pick-a-Pic's agreement."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from visalign.rewards.labels import PICK_A_PIC_AGREEMENT, bradley_terry_labels, temperature_for_agreement

    meta = dst / "flipped.json"
    if meta.exists():
        return dst, json.loads(meta.read_text())["expected_flip_rate"]
    rows = pair_rows(src)
    s0 = torch.tensor([r["score_0"] for r in rows], dtype=torch.float64)
    s1 = torch.tensor([r["score_1"] for r in rows], dtype=torch.float64)
    temp = temperature_for_agreement((s0 - s1).abs(), PICK_A_PIC_AGREEMENT)
    truth = (s0 > s1).double()  # the noiseless taste (make-dataset puts the higher score first)
    labels = bradley_terry_labels(s0, s1, temp, torch.Generator().manual_seed(seed))
    flipped = [i for i in range(len(rows)) if labels[i] != truth[i]]
    for r, lab in zip(rows, labels.tolist()):
        r["label_0"] = float(lab)
    dst.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), dst / "pairs-bt.parquet")
    rate = 1.0 - PICK_A_PIC_AGREEMENT
    meta.write_text(json.dumps({"temperature": temp, "flipped": len(flipped), "rows": len(rows), "indices": flipped,
                                "expected_flip_rate": rate, "realised_flip_rate": len(flipped) / len(rows)}))
    return dst, rate


def evaluate(base: str, summary: dict, seed: int) -> list[dict]:
    """Held-out GenEval-shapes samples on fresh seeds in fp32 (images kept for the rater)."""
    from visalign.demo import heldout_results, sampling_backbone

    bb = sampling_backbone(summary.get("model", base), summary.get("lora"), bf16=False)
    return heldout_results(bb, per_task=PER_TASK, seed=seed)


def trained(base: str, pairs: Path, run: Path, args, over: list[str], rate: float) -> dict:
    """The row's finished run (reused: a second seed set scores the same adapters; one trained with other
    settings is refused, naming what differs), else a new one."""
    from visalign.config import load_config
    from visalign.train.checkpoint import check_same_run
    from visalign.train.loop import train

    cfg = load_config("shapes", [], _settings(base, pairs, run, args, over, rate))
    if (run / "summary.json").exists():
        check_same_run(json.loads(json.dumps(cfg.to_dict())), run, resuming=True)
        summary = json.loads((run / "summary.json").read_text())
        if summary["steps"] != args.steps:
            raise SystemExit(f"--steps: {run} holds a {summary['steps']}-step run, not {args.steps}")
        return summary
    random.seed(args.seed)
    return train(cfg)


def compare_to_base(base_res: list[dict], res: list[dict]) -> dict:
    from visalign.demo import paired_improvement, rater_comparison

    rater = rater_comparison(base_res, res)
    return {"win_rate": rater["win_rate"], "ci": [rater["ci_low"], rater["ci_high"]], "win_se": rater["se"],
            "win_z": rater["z"], "terms": rater["terms"], "geneval_vs_base": paired_improvement(base_res, res)}


def _term(terms: dict, k: str) -> str:
    return f"{terms[k]['change']:+.3f} ± {terms[k]['se']:.3f}" if k in terms else "—"


def write_table(out: Path, table: dict) -> str:
    rows = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["method"]] = r
    order = list(table)
    noisy = any("true_label_acc" in r for r in rows.values())  # the noise experiment: did it fit the noise?
    head = ("| method | training | rater win rate vs base [95% CI] | z vs 50% | size term | margin | crisp | centre "
            "| prompt term | GenEval-shapes | change (paired SE) | steps | wall |"
            + (" implicit acc., true labels: flipped pairs | unflipped pairs |" if noisy else ""))
    md = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in sorted(rows, key=lambda m: order.index(m) if m in order else len(order)):
        r = rows[name]
        prec = "bf16" if "train.mixed_precision=bf16" in (r["overrides"] or []) else "fp32"
        acc = r.get("true_label_acc")
        extra = "".join(f" {acc[k]['accuracy']:.3f} ± {acc[k]['se_by_prompt']:.3f} (n={acc[k]['n']}) |"
                        if acc else " — |" for k in ("flipped", "unflipped")) if noisy else ""
        if r["overrides"] is None:
            md.append(f"| {name} | — | — | — | — | — | — | — | — | {r['overall']:.3f} | — | — | — |{extra}")
            continue
        g = r["geneval_vs_base"]
        terms = " | ".join(_term(r["terms"], k) for k in ("size", "margin", "crisp", "centre", "prompt"))
        md.append(f"| {name} | {prec} | {r['win_rate']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {r['win_z']:+.1f} "
                  f"| {terms} "
                  f"| {r['overall']:.3f} | {g['delta']:+.3f} ± {g['se']:.3f} | {r['steps']} | "
                  f"{r['seconds'] / 60:.1f} min |{extra}")
    text = "\n".join(md) + "\n"
    (out / "table.md").write_text(text)
    return text


def _settings(base: str, pairs: Path, run: Path, args, over: list[str], rate: float) -> list[str]:
    return [f"model.path={base}", f"data.path={pairs}", f"train.output_dir={run}", f"train.steps={args.steps}",
            "train.batch_size=16", "train.lr=3e-4", f"train.seed={args.seed}", "train.save_every=0",
            "train.warmup_steps=10", "train.mixed_precision=no", "lora.rank=8", "lora.alpha=8",
            f"train.threads={args.threads}",
            *[o.replace("@rate", f"{rate:.3f}") for o in over if not o.startswith("@") or "=" in o]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/rater")
    ap.add_argument("--experiment", choices=("compare", "noise"), default="compare")
    ap.add_argument("--base", default="assets/shapes-base")
    ap.add_argument("--data", default="", help="a make-dataset folder to reuse (default: OUT/data, built once)")
    ap.add_argument("--methods", default="", help="rows to run, comma-separated (';' when a name holds a comma)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--eval-seed", type=int, default=FRESH_SEED,
                    help="held-out sampling seed; a second seed set: a new --out whose runs/ links the first's")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()

    from visalign.models.load import resolve_path

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = METHODS if args.experiment == "compare" else NOISE
    if args.table_only:
        print(write_table(out, table))
        return
    sep = ";" if ";" in args.methods else ","  # some row names hold commas: list those with ';'
    asked = [m.strip() for m in args.methods.split(sep) if m.strip()]
    if unknown := [m for m in asked if m not in table]:
        raise SystemExit(f"--methods: unknown {unknown}; expected some of: {', '.join(table)}")
    base = resolve_path(args.base)
    data = Path(args.data) if args.data else out / "data"
    if not (data / "provenance.json").exists():
        from visalign.demo import build_demo_data

        build_demo_data(data, base, threads=args.threads, progress=False, bf16=False)
    noisy, rate = {}, 0.3
    if args.experiment == "noise":
        noisy["@flipped"] = flip_labels(data / "pairs", out / "flipped", 0.3)
        noisy["@bt"], rate = bt_relabel(data / "pairs", out / "bt")
    results_file, base_file = out / "results.jsonl", out / "base_results.pt"
    for name in asked or list(table):  # in the order asked
        done = {json.loads(x)["method"] for x in results_file.read_text().splitlines()} if results_file.exists() else ()
        if name in done:
            continue
        over = table[name]
        summary: dict = {"steps": 0, "pairs_seen": 0, "seconds": 0.0}
        source = next((noisy[o] for o in over or [] if o in noisy), None)
        if over is not None:
            pairs = source or data / ("." if "data.format=lists" in over else "pairs")
            summary = trained(base, pairs, out / "runs" / slug(name), args, over, rate)
        t0 = time.time()
        res = evaluate(base, summary, args.eval_seed)
        from visalign.eval.geneval import summarise

        row = {"method": name, "overrides": over, "eval_seed": args.eval_seed, **summarise(res),
               "steps": summary["steps"], "pairs_seen": summary["pairs_seen"]}
        if over is None:
            torch.save(res, base_file)
        else:
            row |= compare_to_base(torch.load(base_file, weights_only=True), res)
        if over is not None and noisy:  # a clean row is scored on the pairs the 30% flip would flip
            row["true_label_acc"] = true_label_accuracy(base, summary, data / "pairs", source or noisy["@flipped"])
        row["seconds"] = summary["seconds"] + time.time() - t0  # training (as it ran) + scoring
        with open(results_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: " + (f"win {row['win_rate']:.3f} ({row['win_z']:+.1f} SE), " if over else "")
              + f"GenEval {row['overall']:.3f}", flush=True)
    print(write_table(out, table))


if __name__ == "__main__":
    main()
