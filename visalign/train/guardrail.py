"""Reward-hacking guardrail and checkpoint choice: a gold reward on fixed prompts and seeds during training.

The prompts are a source of their own (``train.gold_prompts``), or ``validation``: the split of the training
prompts that ``data.validation_fraction`` holds back from the rounds. Where the prompts carry task tags, each
evaluation's ``score`` is the mean of the per-task means (every task counts once, however many prompts it
has); without tags it is the plain mean. ``select_best=gold`` keeps the weights of the best score.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..config import RunConfig
from ..files import read_jsonl


def best_evaluation(rows: list[dict]) -> dict | None:
    """The row with the highest ``score`` (``gold`` in logs from before scores), the earliest on a tie."""
    best = None
    for row in rows:
        value = row.get("score", row.get("gold"))
        if isinstance(value, (int, float)) and (best is None or value > best[0]):
            best = (value, row)
    return None if best is None else best[1]


def task_scores(values: torch.Tensor, tags: list[str] | None) -> tuple[float, dict[str, float]]:
    """(score, {task: mean}): the mean over tasks of each task's mean value; the plain mean without tags."""
    if not tags:
        return float(values.mean()), {}
    means = {t: float(values[[i for i, g in enumerate(tags) if g == t]].mean()) for t in sorted(set(tags))}
    return sum(means.values()) / len(means), means


class Guardrail:
    """Every ``gold_every`` steps: sample fixed prompts/seeds, score gold (and proxy), keep the best weights."""

    def __init__(self, cfg: RunConfig, out: Path):
        from ..data.prompts import prompts_and_tags, validation_prompts
        from ..rewards.base import build_reward

        t = cfg.train
        self.cfg, self.out = cfg, out
        self.gold = build_reward(t.gold_reward)
        self.proxy = build_reward(t.proxy_reward) if t.proxy_reward else None
        if t.gold_prompts == "validation":
            prompts, tags = validation_prompts(cfg.data.path, cfg.data.validation_fraction)
        else:
            prompts, tags = prompts_and_tags(t.gold_prompts, key="train.gold_prompts")
        self.prompts = [prompts[i % len(prompts)] for i in range(t.gold_samples)]
        self.tags = None if tags is None else [tags[i % len(tags)] for i in range(t.gold_samples)]
        # a resumed run continues the choice: the log was trimmed to the checkpoint's step, and evaluations
        # after it are redone identically
        self.rows = read_jsonl(out / "gold.jsonl") if (out / "gold.jsonl").exists() else []
        best = best_evaluation(self.rows)
        self.best, self.best_step = (best.get("score", best["gold"]), best["step"]) if best else (float("-inf"), None)

    @torch.no_grad()
    def evaluate(self, acc, backbone, step: int) -> dict:
        t = self.cfg.train
        gen = torch.Generator().manual_seed(t.seed + 7)
        noise = torch.randn((len(self.prompts), *backbone.sample_shape), generator=gen).to(backbone.device)
        with backbone.sampling_mode():
            images = backbone.sample(self.prompts, steps=t.sample_steps, guidance=t.guidance,
                                     latents=noise).images.cpu()
        gold = self.gold(images, self.prompts).float()
        score, per_task = task_scores(gold, self.tags)
        row = {"step": step, "gold": float(gold.mean()), "score": score,
               **{f"task/{k}": v for k, v in per_task.items()}}
        if self.proxy is not None:
            row["proxy"] = float(self.proxy(images, self.prompts).mean())
        self.rows.append(row)
        if acc.is_main_process:
            with open(self.out / "gold.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            acc.log({f"guardrail/{k}": v for k, v in row.items() if k != "step"}, step=step)
            if t.select_best == "gold" and score > self.best:
                self.best, self.best_step = score, step
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
        """With select_best=gold the final outputs are the best-scoring weights, and one line says why."""
        if self.cfg.train.select_best != "gold" or self.best_step is None:
            return {}
        for name in ("lora", "model"):
            src = out / "best" / name
            if src.exists():
                shutil.rmtree(out / name, ignore_errors=True)
                shutil.copytree(src, out / name)
        last = self.rows[-1]
        how = (f"the mean of {sum(1 for k in last if k.startswith('task/'))} tasks' {self.cfg.train.gold_reward}"
               if self.tags else f"mean {self.cfg.train.gold_reward}")
        why = (f"kept the weights of step {self.best_step}: validation score {self.best:.4f} ({how} on "
               f"{len(self.prompts)} samples of {self.cfg.train.gold_prompts}), the best of {len(self.rows)} "
               f"evaluations; the last, step {last['step']}, scored {last.get('score', last['gold']):.4f}")
        print(why, flush=True)
        with open(out / "selection.log", "a") as f:
            f.write(why + "\n")
        return {"best_step": self.best_step, "best_gold": self.best, "selection": why}
