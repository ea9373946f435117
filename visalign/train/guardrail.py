"""Reward-hacking guardrail: a held-out gold reward on fixed prompts and seeds during training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..config import RunConfig


class Guardrail:
    """Every ``gold_every`` steps: sample fixed prompts/seeds, score gold (and proxy), keep the best weights."""

    def __init__(self, cfg: RunConfig, out: Path):
        from ..data.prompts import read_prompts
        from ..rewards.base import build_reward

        t = cfg.train
        self.cfg, self.out = cfg, out
        self.gold = build_reward(t.gold_reward)
        self.proxy = build_reward(t.proxy_reward) if t.proxy_reward else None
        prompts = read_prompts(t.gold_prompts, key="train.gold_prompts")
        self.prompts = [prompts[i % len(prompts)] for i in range(t.gold_samples)]
        self.best, self.best_step = float("-inf"), None

    @torch.no_grad()
    def evaluate(self, acc, backbone, step: int) -> dict:
        t = self.cfg.train
        gen = torch.Generator().manual_seed(t.seed + 7)
        noise = torch.randn((len(self.prompts), *backbone.sample_shape), generator=gen).to(backbone.device)
        with backbone.sampling_mode():
            images = backbone.sample(self.prompts, steps=t.sample_steps, guidance=t.guidance,
                                     latents=noise).images.cpu()
        row = {"step": step, "gold": float(self.gold(images, self.prompts).mean())}
        if self.proxy is not None:
            row["proxy"] = float(self.proxy(images, self.prompts).mean())
        if acc.is_main_process:
            with open(self.out / "gold.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            acc.log({f"guardrail/{k}": v for k, v in row.items() if k != "step"}, step=step)
            if t.select_best == "gold" and row["gold"] > self.best:
                self.best, self.best_step = row["gold"], step
                self._save_best(backbone, step, row)
        return row

    def _save_best(self, backbone, step: int, row: dict) -> None:
        from .outputs import save_weights

        best = self.out / "best"
        tmp = self.out / "best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_weights(backbone, self.cfg, tmp)
        (tmp / "best.json").write_text(json.dumps(row))
        shutil.rmtree(best, ignore_errors=True)
        tmp.rename(best)

    def finalise(self, out: Path) -> dict:
        """With select_best=gold the final outputs are the best-gold weights."""
        if self.cfg.train.select_best != "gold" or self.best_step is None:
            return {}
        for name in ("lora", "model"):
            src = out / "best" / name
            if src.exists():
                shutil.rmtree(out / name, ignore_errors=True)
                shutil.copytree(src, out / name)
        return {"best_step": self.best_step, "best_gold": self.best}
