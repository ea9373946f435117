"""`make demo`: ShapesWorld base -> synthetic ranked data (shapes reward) -> Diffusion-DPO (LoRA) ->
GenEval-shapes of base and tuned model on held-out prompts with the same seeds -> a printed table."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch


def paired_improvement(base: list[dict], tuned: list[dict]) -> dict:
    """Overall improvement and its standard error from per-image pairs (same prompt, same seed).

    Per task: the mean of d = correct_tuned − correct_base and its SE; overall = unweighted mean
    over tasks (as GenEval's overall), SE = sqrt(Σ SE_task²)/n_tasks.
    """
    by_key = {(r["prompt_index"], r["k"]): r for r in base}
    tasks: dict[str, list[float]] = {}
    for r in tuned:
        b = by_key[(r["prompt_index"], r["k"])]
        tasks.setdefault(r["tag"], []).append(float(r["correct"]) - float(b["correct"]))
    means, ses = [], []
    for ds in tasks.values():
        m = sum(ds) / len(ds)
        var = sum((d - m) ** 2 for d in ds) / max(len(ds) - 1, 1)
        means.append(m)
        ses.append(math.sqrt(var / len(ds)))
    delta = sum(means) / len(means)
    se = math.sqrt(sum(s * s for s in ses)) / len(ses)
    return {"delta": delta, "se": se, "z": delta / se if se > 0 else float("inf")}


SAMPLE_STEPS, EVAL_SEED = 20, 1234


def build_demo_data(data_dir: Path, base_path: str, per_task: int = 40, images_per_prompt: int = 4,
                    steps: int = SAMPLE_STEPS, bf16: bool = True, threads: int = 0, progress: bool = True,
                    guidance: float | None = None) -> dict:
    """The demo's preference data: ``per_task`` balanced training prompts per task x ``images_per_prompt``
    base samples scored by the shapes reward; every pair at least 0.15 apart (one GenEval constraint).
    ``guidance=None``: the base folder's declared guidance."""
    from .data.make_dataset import MakeDatasetConfig, make_dataset
    from .worlds.shapes.render import balanced_records

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    prompts = data_dir.with_name("train_prompts.txt")
    prompts.write_text("\n".join(r["prompt"] for r in balanced_records("train", per_task)))
    return make_dataset(MakeDatasetConfig(
        prompts=str(prompts), models=[f"pixel={base_path}"], images_per_prompt=images_per_prompt, rewards=["shapes"],
        out=str(data_dir), steps=steps, guidance=guidance, seed=0, batch_size=64, shard_size=64, normalise="none",
        pairs="all", min_margin=0.15, bf16=bf16, threads=threads), progress=progress)


def sampling_backbone(model_path: str, lora: str | Path | None = None, bf16: bool = True):
    """The ShapesWorld model (with its LoRA, if any) ready to sample as the demo does: eval mode, on the
    sampling device, bf16 sampling (`visalign eval`'s loader with the pixel backbone)."""
    from .eval.commands import load_backbone_cli

    return load_backbone_cli(model_path, "pixel", str(lora) if lora is not None else None, bf16)


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
                     bf16: bool = True, guidance: float | None = None):
    """(backbone, GenEval-shapes results) on ``per_task`` held-out samples per task, the demo's fixed seeds."""
    bb = sampling_backbone(model_path, lora, bf16)
    return bb, heldout_results(bb, per_task, steps, guidance=guidance)


def run_demo(out: str | Path = "runs/demo", quick: bool = False, base: str = "assets/shapes-base",
             guidance: float | None = None) -> dict:
    from .config import load_config
    from .eval.geneval import format_table, write_results
    from .eval.implicit import implicit_accuracy, pairs_from_results
    from .models.load import default_guidance, resolve_path
    from .train.loop import train

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
    print(f"[1/4] make-dataset: {budget['train_per_task']} training prompts per task x "
          f"{budget['images_per_prompt']} base samples, scored by the shapes reward; every pair of samples "
          "that differ by at least one GenEval constraint")
    ds = build_demo_data(out / "data", base_path, budget["train_per_task"], budget["images_per_prompt"],
                         budget["steps"], bf16=not quick, progress=not quick, guidance=guidance)
    print(f"      {ds['images']} images in {ds['seconds']:.0f}s -> {out / 'data'}")

    print(f"[2/4] finetune: Diffusion-DPO + LoRA, {budget['train_steps']} steps")
    cfg = load_config("shapes", [], [
        f"model.path={base_path}", f"data.path={out / 'data' / 'pairs'}", f"train.output_dir={out / 'run'}",
        f"train.steps={budget['train_steps']}", f"train.batch_size={budget['batch']}", "train.lr=3e-4",
        "train.warmup_steps=10", "train.save_every=0", "train.log_every=10", "lora.rank=8", "lora.alpha=8",
        f"train.guidance={guidance}",
        f"train.mixed_precision={'no' if quick else 'bf16'}"])
    summary = train(cfg)
    print(f"      {summary['steps']} steps in {summary['seconds']:.0f}s -> {summary.get('lora')}")

    print("[3/4] GenEval-shapes on held-out prompts, same seeds for both models")
    heldout_args = dict(per_task=budget["eval_per_task"], steps=budget["steps"], bf16=not quick, guidance=guidance)
    results = {}
    _, results["base"] = generate_heldout(base_path, None, **heldout_args)
    tuned, results["dpo-lora"] = generate_heldout(base_path, summary["lora"], **heldout_args)
    # held-out pairs: two base samples of one held-out prompt that differ by >= 0.15 in constraints met
    # (at most 256 of them, 4 (t, ε) draws each: about 20 s here)
    pairs = pairs_from_results(results["base"])
    pairs = [pairs[i] for i in sorted(random.Random(0).sample(range(len(pairs)), min(256, len(pairs))))]
    heldout = implicit_accuracy(tuned, pairs, beta=cfg.objective.kwargs.get("beta", 5000.0), draws=4)
    metrics = {name: write_results(res, out / "eval" / name, extra={"model": name}) for name, res in results.items()}
    imp = paired_improvement(results["base"], results["dpo-lora"])
    elapsed = time.time() - t_start
    print("[4/4] results (accuracy ± standard error)\n")
    print(format_table(metrics))
    print(f"\noverall improvement: {imp['delta']:+.3f} ± {imp['se']:.3f} (paired SE; {imp['z']:.1f} SE)")
    print(f"implicit accuracy on {heldout['n']} held-out pairs of base samples: {heldout['accuracy']:.3f} ± "
          f"{heldout['se_by_prompt']:.3f} (SE clustered by prompt, as a prompt's pairs share images; "
          "the base ranks none: h = 0)")
    print(f"grids: {out / 'eval' / 'base' / 'grid.png'}  {out / 'eval' / 'dpo-lora' / 'grid.png'}")
    print(f"logs:  {out / 'run' / 'metrics.jsonl'} (TensorBoard: {out / 'run' / 'logs'})")
    print(f"total time: {elapsed / 60:.1f} min")
    report = {"metrics": metrics, "improvement": imp, "heldout_implicit": heldout, "seconds": elapsed,
              "dataset": ds, "train": summary}
    (out / "demo.json").write_text(json.dumps(report, indent=2, default=str))
    return report
