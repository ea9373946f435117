"""GenEval-style evaluation: fixed-seed generation, detection, GenEval's rules, metrics.json and a grid."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import UserError
from ..registry import DETECTORS
from ..seeds import derived_seed
from .grid import image_grid, save_png
from .rules import TASKS, evaluate_objects


def sample_seed(seed: int, prompt_idx: int, k: int) -> int:
    return derived_seed("geneval", seed, prompt_idx, k)


def summarise(per_image: Sequence[dict]) -> dict:
    """Task accuracy with standard error and n; overall = unweighted mean of task scores (GenEval)."""
    tasks: dict[str, list[bool]] = {}
    for r in per_image:
        tasks.setdefault(r["tag"], []).append(bool(r["correct"]))
    out = {"tasks": {}}
    for tag in [t for t in TASKS if t in tasks] + [t for t in tasks if t not in TASKS]:
        xs = tasks[tag]
        p = sum(xs) / len(xs)
        out["tasks"][tag] = {"accuracy": p, "se": math.sqrt(p * (1 - p) / len(xs)), "n": len(xs)}
    scores = [v["accuracy"] for v in out["tasks"].values()]
    ses = [v["se"] for v in out["tasks"].values()]
    out["overall"] = sum(scores) / len(scores) if scores else float("nan")
    # SE of an unweighted mean of independent task means
    out["overall_se"] = math.sqrt(sum(s * s for s in ses)) / len(ses) if ses else float("nan")
    out["n"] = len(per_image)
    return out


@torch.no_grad()
def generate_and_score(backbone, records: Sequence[dict], samples_per_prompt: int = 4, seed: int = 0,
                       steps: int = 20, guidance: float = 3.0, batch_size: int = 64, detector="shapes") -> list[dict]:
    """One image per (record, k) from a fixed seed; each scored by GenEval's rules on ``detector``'s objects
    (a ``DETECTORS`` name or instance: ShapesWorld's exact one, OWLv2 for real models, or a plug-in's)."""
    if isinstance(detector, str):
        detector = DETECTORS.build(detector)
    detector.check_records(records)
    jobs = [(i, k) for i in range(len(records)) for k in range(samples_per_prompt)]
    results = []
    for start in range(0, len(jobs), batch_size):
        part = jobs[start:start + batch_size]
        noise = torch.stack([torch.randn(backbone.sample_shape, generator=torch.Generator().manual_seed(
            sample_seed(seed, i, k))) for i, k in part])
        images = backbone.sample([records[i]["prompt"] for i, _ in part], steps=steps, guidance=guidance,
                                 latents=noise).images.cpu()
        for (i, k), img in zip(part, images):
            correct, frac, reasons = evaluate_objects(detector.objects(img, records[i]), records[i])
            results.append({"prompt_index": i, "k": k, "tag": records[i]["tag"], "prompt": records[i]["prompt"],
                            "correct": correct, "constraints": frac, "reasons": reasons, "image": img})
    return results


def write_results(results: list[dict], out_dir: str | Path, extra: dict | None = None,
                  grid_per_task: int = 8) -> dict:
    """metrics.json (+ per-image results.jsonl) and a labelled grid (green = correct, red = wrong)."""
    if not results:
        raise UserError("no images were scored (no prompts, or zero samples per prompt); nothing written")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = summarise(results) | (extra or {})
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(out / "metrics.json")
    with open(out / "results.jsonl.tmp", "w") as f:
        for r in results:
            f.write(json.dumps({k: v for k, v in r.items() if k != "image"}) + "\n")
    (out / "results.jsonl.tmp").replace(out / "results.jsonl")
    shown = []
    for tag in TASKS:
        shown += [r for r in results if r["tag"] == tag][:grid_per_task]
    if shown:
        grid = image_grid([r["image"] for r in shown], [r["prompt"].replace("a photo of ", "") for r in shown],
                          cols=grid_per_task, scale=3, label_height=12,
                          border=[(40, 170, 60) if r["correct"] else (215, 40, 40) for r in shown])
        save_png(grid, out / "grid.png")
    return metrics


def format_table(rows: dict[str, dict]) -> str:
    """A markdown table of overall and per-task accuracy ± SE for several named metrics dicts."""
    tags = [t for t in TASKS if any(t in m["tasks"] for m in rows.values())]
    head = "| model | overall | " + " | ".join(tags) + " |"
    sep = "|" + "---|" * (len(tags) + 2)
    lines = [head, sep]
    for name, m in rows.items():
        cells = [f"{m['overall']:.3f} ± {m['overall_se']:.3f}"]
        cells += [f"{m['tasks'][t]['accuracy']:.2f} ± {m['tasks'][t]['se']:.2f}" if t in m["tasks"] else "-"
                  for t in tags]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
