"""`make demo`: ShapesWorld base -> synthetic ranked data labelled by the rater -> Diffusion-DPO (LoRA) ->
the rater's win rate and GenEval-shapes of base and tuned model on held-out prompts with the same seeds ->
printed tables and report.html."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .eval.stats import paired_improvement  # noqa: F401  (the demo's table; scripts import it here)

SAMPLE_STEPS, EVAL_SEED = 20, 1234


DEMO_REWARD, DEMO_MARGIN = "rater", 0.05  # the rater's scale: 0.05 is a visible difference in look or one constraint


def build_demo_data(data_dir: Path, base_path: str, per_task: int = 40, images_per_prompt: int = 4,
                    steps: int = SAMPLE_STEPS, bf16: bool | None = None, threads: int = 0, progress: bool = True,
                    guidance: float | None = None, reward: str = DEMO_REWARD, min_margin: float = DEMO_MARGIN) -> dict:
    """The demo's preference data: ``per_task`` balanced training prompts per task x ``images_per_prompt``
    base samples scored by ``reward`` (the rater: what a person would prefer); every pair at least
    ``min_margin`` apart. ``guidance=None``: the base folder's declared guidance."""
    from .data.make_dataset import MakeDatasetConfig, make_dataset
    from .worlds.shapes.render import balanced_records

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    prompts = data_dir.with_name("train_prompts.txt")
    prompts.write_text("\n".join(r["prompt"] for r in balanced_records("train", per_task)))
    return make_dataset(MakeDatasetConfig(
        prompts=str(prompts), models=[f"pixel={base_path}"], images_per_prompt=images_per_prompt, rewards=[reward],
        out=str(data_dir), steps=steps, guidance=guidance, seed=0, batch_size=64, shard_size=64, normalise="none",
        pairs="all", min_margin=min_margin, bf16=fast_bf16() if bf16 is None else bf16, threads=threads),
        progress=progress)


def rater_comparison(base: list[dict], tuned: list[dict]) -> dict:
    """The rater's win rate of ``tuned`` over ``base`` on the same held-out samples (same prompt and seed,
    ties half) and each taste term's paired change: the demo's headline, scored from the GenEval images."""
    from .eval.winrate import paired_term_changes, win_rate, win_rate_z
    from .worlds.shapes.rater import RaterReward

    rater = RaterReward()
    key = lambda r: (r["prompt_index"], r["k"])  # noqa: E731
    terms = {name: [rater.terms(r["image"], r["prompt"]) for r in sorted(res, key=key)]
             for name, res in (("base", base), ("tuned", tuned))}
    scores = {name: torch.tensor([rater.combine(t) for t in ts]) for name, ts in terms.items()}
    result = win_rate(scores["tuned"], scores["base"])
    return result | {"z": win_rate_z(result), "terms": paired_term_changes(terms["tuned"], terms["base"]),
                     "weights": rater.weights}


def fast_bf16() -> bool:
    """bf16 where it is native (the demo's default), fp32 where it would be emulated (about 17x slower)."""
    from .models.load import native_bf16, sampling_device

    return native_bf16(sampling_device())


def sampling_backbone(model_path: str, lora: str | Path | None = None, bf16: bool | None = None):
    """The ShapesWorld model (with its LoRA, if any) ready to sample as the demo does: eval mode, on the
    sampling device, bf16 sampling (`visalign eval`'s loader with the pixel backbone)."""
    from .eval.commands import load_backbone_cli

    return load_backbone_cli(model_path, "pixel", str(lora) if lora is not None else None,
                             fast_bf16() if bf16 is None else bf16)


def heldout_results(bb, per_task: int = 50, steps: int = SAMPLE_STEPS, split: str = "eval",
                    guidance: float | None = None, seed: int = EVAL_SEED) -> list[dict]:
    """GenEval-shapes results of ``per_task`` samples per task of ``split``'s prompts (the demo's fixed seeds
    unless ``seed`` says otherwise: re-score a candidate on fresh seeds before believing it), at ``guidance``
    or the model folder's declared one."""
    from .eval.geneval import generate_and_score
    from .models.load import sampling_guidance
    from .worlds.shapes.render import balanced_records

    with torch.no_grad():
        return generate_and_score(bb, balanced_records(split, per_task), 1, seed=seed, steps=steps,
                                  guidance=sampling_guidance(bb, guidance))


def generate_heldout(model_path: str, lora: str | Path | None = None, per_task: int = 50, steps: int = SAMPLE_STEPS,
                     bf16: bool | None = None, guidance: float | None = None):
    """(backbone, GenEval-shapes results) on ``per_task`` held-out samples per task, the demo's fixed seeds."""
    bb = sampling_backbone(model_path, lora, bf16)
    return bb, heldout_results(bb, per_task, steps, guidance=guidance)


def run_demo(out: str | Path = "runs/demo", quick: bool = False, base: str = "assets/shapes-base",
             guidance: float | None = None) -> dict:
    """ShapesWorld end to end: rater-labelled data from the base -> Diffusion-DPO -> rater win rate and
    GenEval-shapes on held-out prompts (same seeds for both models) -> report.html."""
    from .models.load import default_guidance, resolve_path

    t_start = time.time()
    out = Path(out)
    base_path = resolve_path(base)
    if not (Path(base_path) / "unet").exists():
        raise FileNotFoundError(f"no ShapesWorld base model at {base_path}; run "
                                "`visalign world shapes pretrain --out assets/shapes-base` first")
    guidance = default_guidance("pixel", base_path) if guidance is None else guidance
    budget = dict(train_per_task=40, images_per_prompt=4, steps=20, train_steps=200, eval_per_task=50, batch=16)
    if quick:
        budget = dict(train_per_task=2, images_per_prompt=2, steps=4, train_steps=3, eval_per_task=2, batch=4)
    bf16 = not quick and fast_bf16()
    if not quick and not bf16:
        print("      this CPU has no native bf16 (AMX or AVX512-BF16): sampling and training run in fp32, which "
              "here is faster than emulated bf16; the numbers differ slightly from a bf16 machine's")
    print(f"[1/4] make-dataset: {budget['train_per_task']} training prompts per task x "
          f"{budget['images_per_prompt']} base samples, scored by the rater (GenEval constraints met + a stated "
          f"taste: size, margins, crispness, centring); every pair of samples at least {DEMO_MARGIN} apart")
    ds = build_demo_data(out / "data", base_path, budget["train_per_task"], budget["images_per_prompt"],
                         budget["steps"], bf16=bf16, progress=not quick, guidance=guidance)
    print(f"      {ds['images']} images in {ds['seconds']:.0f}s -> {out / 'data'}")
    summary = _train_demo(out, base_path, budget, guidance, bf16)
    print("[3/4] held-out prompts, the same seeds for both models: the rater's verdict and GenEval-shapes")
    heldout_args = dict(per_task=budget["eval_per_task"], steps=budget["steps"], bf16=bf16, guidance=guidance)
    results = {}
    _, results["base"] = generate_heldout(base_path, None, **heldout_args)
    _, results["dpo-lora"] = generate_heldout(base_path, summary["lora"], **heldout_args)
    report = _report(out, results, ds, summary, t_start)
    return report


def _train_demo(out: Path, base_path: str, budget: dict, guidance: float, bf16: bool) -> dict:
    from .config import load_config
    from .train.loop import train

    print(f"[2/4] finetune: Diffusion-DPO + LoRA, {budget['train_steps']} steps")
    shutil.rmtree(out / "run", ignore_errors=True)  # the demo's own run folder: a rerun starts it over
    cfg = load_config("shapes", [], [
        f"model.path={base_path}", f"data.path={out / 'data' / 'pairs'}", f"train.output_dir={out / 'run'}",
        f"train.steps={budget['train_steps']}", f"train.batch_size={budget['batch']}", "train.lr=3e-4",
        "train.warmup_steps=10", "train.save_every=0", "train.log_every=10", "lora.rank=8", "lora.alpha=8",
        f"train.guidance={guidance}",
        f"train.mixed_precision={'bf16' if bf16 else 'no'}"])
    summary = train(cfg)
    print(f"      {summary['steps']} steps in {summary['seconds']:.0f}s -> {summary.get('lora')}")
    return summary


def _report(out: Path, results: dict, ds: dict, summary: dict, t_start: float) -> dict:
    from .eval.geneval import format_table, write_results
    from .eval.report import build_report

    rater = rater_comparison(results["base"], results["dpo-lora"])
    metrics = {name: write_results(res, out / "eval" / name, extra={"model": name}) for name, res in results.items()}
    (out / "eval" / "winrate.json").write_text(json.dumps({**rater, "reward": "rater"}, indent=2))
    imp = paired_improvement(results["base"], results["dpo-lora"])
    print("[4/4] results\n")
    print(f"rater win rate of the tuned model over the base: {rater['win_rate']:.3f} "
          f"[95% CI {rater['ci_low']:.3f}, {rater['ci_high']:.3f}], {rater['z']:.1f} SE above 1/2 "
          f"({rater['wins']} wins, {rater['ties']} ties, {rater['losses']} losses of {rater['n']})")
    print("| rater term | weight | base | tuned | paired change |\n|---|---|---|---|---|")
    for term, v in rater["terms"].items():
        print(f"| {term} | {rater['weights'][term]} | {v['baseline']:.3f} | {v['model']:.3f} | "
              f"{v['change']:+.4f} ± {v['se']:.4f} |")
    print("\nGenEval-shapes (accuracy ± standard error)\n")
    print(format_table(metrics))
    print(f"\nGenEval-shapes change: {imp['delta']:+.3f} ± {imp['se']:.3f} (paired SE; {imp['z']:.1f} SE)")
    page = build_report(out / "run", baseline=out / "eval", grid=True)
    elapsed = time.time() - t_start
    print(f"grids: {out / 'eval' / 'base' / 'grid.png'}  {out / 'eval' / 'dpo-lora' / 'grid.png'}")
    print(f"report: {page}")
    print(f"total time: {elapsed / 60:.1f} min")
    report = {"rater": rater, "metrics": metrics, "improvement": imp, "seconds": elapsed, "dataset": ds,
              "train": summary, "report": str(page)}
    (out / "demo.json").write_text(json.dumps(report, indent=2, default=str))
    return report
