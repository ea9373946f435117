"""What a run leaves behind: LoRA (diffusers format) or a full pipeline folder, a model card, sample grids."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import RunConfig, dump_config
from ..eval.grid import image_grid, save_png
from ..models.load import SAMPLING_FILE


def save_weights(backbone, cfg: RunConfig, out: Path) -> dict:
    """The trained weights only: out/lora (diffusers LoRA) or out/model (a full pipeline folder)."""
    from ..models.lora import save_lora

    if cfg.lora.enabled:  # built beside, then renamed: a kill mid-write never leaves a half LoRA as the output
        import shutil

        tmp = out / "lora.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_lora(backbone, tmp)
        shutil.rmtree(out / "lora", ignore_errors=True)
        tmp.rename(out / "lora")
        return {"lora": str(out / "lora")}
    # the fine-tune is sampled as it was trained: its folder declares the run's guidance (see models.load)
    sampling = {"guidance": cfg.train.guidance,
                "note": f"train.guidance of the run that made it ({cfg.objective.name})"}
    return {"model": str(backbone.save_full(out / "model", extra={SAMPLING_FILE: sampling}))}


def save_outputs(backbone, cfg: RunConfig, out: Path) -> dict:
    result = save_weights(backbone, cfg, out)
    _model_card(cfg, out, result)
    return result


def _model_card(cfg: RunConfig, out: Path, result: dict) -> None:
    metrics = {}
    mf = out / "metrics.jsonl"
    if mf.exists():
        lines = mf.read_text().splitlines()
        metrics = json.loads(lines[-1]) if lines else {}
    kind = "LoRA (diffusers format; `pipe.load_lora_weights(dir)`)" if cfg.lora.enabled else "full fine-tune"
    text = f"""---
library_name: diffusers
tags: [visalign, {cfg.objective.name}, text-to-image, preference-alignment]
base_model: {cfg.model.kwargs.get('path', '')}
---
# {cfg.objective.name} on {cfg.model.kwargs.get('path', cfg.model.name)}

Trained with [visalign](https://github.com/) `finetune`: {kind}.

- base model: `{cfg.model.kwargs.get('path', '')}` (backbone `{cfg.model.name}`)
- method: `{cfg.objective.name}` {json.dumps(cfg.objective.to_dict())}
- data: `{cfg.data.path}` ({cfg.data.format})
- steps: {cfg.train.steps}, batch {cfg.train.batch_size} x accumulation {cfg.train.grad_accum}, lr {cfg.train.lr}
- final training metrics: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})}
- outputs: {json.dumps(result)}

## Config
```yaml
{dump_config(cfg)}```
"""
    tmp = out / "README.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "README.md")


@torch.no_grad()
def save_validation_grid(acc, backbone, cfg: RunConfig, step: int) -> None:
    """Fixed prompts and seeds every N steps: PNG under samples/ and an image in the tracker."""
    if not acc.is_main_process:
        return
    prompts = list(cfg.train.validation_prompts)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    with backbone.sampling_mode():
        images = backbone.sample(prompts, steps=cfg.train.sample_steps, guidance=cfg.train.guidance,
                                 generator=gen).images
    grid = image_grid(list(images.cpu()), prompts, cols=min(8, len(prompts)))
    save_png(grid, Path(cfg.train.output_dir) / "samples" / f"step-{step:07d}.png")
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
