"""The "Will it fit?" table: `visalign plan`'s estimate for real-size families at 1024², LoRA-DPO and GRPO,
quantized and not (docs/results.md, README). Every row is an estimate until a GPU measures it
(scripts/gpu_check.py).

    python scripts/plan_table.py [--families sdxl,sd3,flux,qwenimage,sana,pixart] [--md OUT.md]
                                 [--fit-dtype bf16|fp32]

The activation models are fitted once per family (minutes for a 12B model on CPU) and cached.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from visalign.data.cache import cache_root
from visalign.models.plan import SIZES_GB, RunShape, plan_parts, published_config
from visalign.models.plan_fit import activation_models

NAMES = {"sdxl": "SDXL", "sd3": "SD3-medium", "flux": "FLUX.1-dev", "qwenimage": "Qwen-Image", "sana": "Sana-1.6B",
         "pixart": "PixArt-Σ"}
METHODS = {"LoRA-DPO": {"batch": 1, "images_per_sample": 2},  # one pair per step
           "GRPO": {"batch": 2, "images_per_sample": 1, "rollouts": 32, "rollout_steps": 10}}  # 4 prompts x 8
SETTINGS = [("as loaded (fp32 base)", {}),
            ("checkpointing + cache", {"checkpointing": True, "cache_complete": True}),
            ("int8 + checkpointing + cache", {"quantize": "int8", "checkpointing": True, "cache_complete": True}),
            ("nf4 + checkpointing + cache", {"quantize": "nf4", "checkpointing": True, "cache_complete": True})]


def rows(families: list[str], fit_dtype: torch.dtype | None = None) -> list[list[str]]:
    out = []
    for family in families:
        config = published_config(family)
        free, ckpt = activation_models(config, family, cache_root() / "plan", dtype=fit_dtype)
        for method, shape_kw in METHODS.items():
            for label, setting in SETTINGS:
                shape = dataclasses.replace(RunShape(family=family, resolution=1024, compute="bf16"), **shape_kw,
                                            **setting)
                total = sum(plan_parts(shape, config, free, ckpt).values()) / 2**30
                fits = " / ".join("yes" if total <= s else "no" for s in SIZES_GB)
                out.append([NAMES.get(family, family), method, label, f"{total:.1f}", fits])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="sdxl,sd3,flux,qwenimage,sana,pixart")
    ap.add_argument("--md", default="")
    ap.add_argument("--fit-dtype", default="", choices=("", "bf16", "fp32"),
                    help="the activation fit's steps (default: bf16 unless this CPU emulates it); fp32 and bf16 "
                         "side by side show how close an fp32 fit scaled to bf16 comes")
    args = ap.parse_args(argv)
    fit_dtype = {"": None, "bf16": torch.bfloat16, "fp32": torch.float32}[args.fit_dtype]
    table = ["| model | method | setting | estimate (GiB) | fits 24 / 48 / 80 GB |", "|---|---|---|---|---|"]
    table += ["| " + " | ".join(r) + " |" for r in rows(args.families.split(","), fit_dtype)]
    text = "\n".join(table) + ("\n\nAll rows are estimates (`visalign plan`): LoRA r8, 1024², AdamW, bf16 "
                                "activations, the frozen base fp32 as loaded unless quantized; until a GPU "
                                "measures them.\n")
    print(text)
    if args.md:
        Path(args.md).write_text(text)


if __name__ == "__main__":
    main()
