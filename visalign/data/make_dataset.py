"""Syn-Pic-style ranked preference data: prompts -> K images per pipeline -> reward ensemble -> ranks.

Each shard holds a fixed slice of prompts and is written to a temporary name, then renamed: a
restart skips finished shards, so a kill at any moment leaves exactly one row per prompt.
Under ``accelerate launch`` each process takes every world-th shard.
"""

from __future__ import annotations

import io
import json
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..eval.grid import to_pil


@dataclass
class MakeDatasetConfig:
    """What to generate, how to score it and where to write it."""

    prompts: str = "shapes:train"
    models: list[str] = field(default_factory=lambda: ["pixel=assets/shapes-base"])  # NAME=PATH or PATH
    images_per_prompt: int = 4
    rewards: list[str] = field(default_factory=lambda: ["shapes"])  # NAME[:WEIGHT]
    out: str = "data/synpic"
    steps: int = 20
    guidance: float | None = None  # None: each model's declared guidance (visalign_sampling.json), else its family's
    eta: float = 0.0
    seed: int = 0
    batch_size: int = 32  # images per sampling call
    shard_size: int = 64  # prompts per shard
    normalise: str = "zscore"  # zscore | rank | none (per prompt, per reward, before the weighted mean)
    pairs: str = ""  # "" | best-worst | all
    min_margin: float = 0.0  # pairs need at least this aggregate-score gap
    max_prompts: int = 0
    repeat_prompts: int = 1  # each prompt this many times (different seeds)
    threads: int = 0
    bf16: bool = False  # sample under bf16 autocast


def parse_reward(spec: str) -> tuple[str, float, dict]:
    """'NAME[:WEIGHT][:key=value,key=value]' -> (name, weight, constructor kwargs)."""
    import yaml

    name, _, rest = spec.partition(":")
    weight, _, opts = rest.partition(":")
    if weight and "=" in weight:
        weight, opts = "", weight
    kwargs = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        kwargs[key.strip()] = yaml.safe_load(value) if value else ""
    try:
        return name, float(weight) if weight else 1.0, kwargs
    except ValueError:
        raise ValueError(f"--reward {spec!r}: expected NAME[:WEIGHT][:key=value,...] with a numeric weight") from None


def parse_model(spec: str) -> tuple[str, str]:
    """'NAME=PATH', a diffusers folder, or 'shapes-render' (the exact ShapesWorld renderer)."""
    from ..models.load import detect_backbone, resolve_path

    if spec == "shapes-render":
        return "shapes-render", "shapes-render"
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name, resolve_path(path)
    path = resolve_path(spec)
    return detect_backbone(path), path


def image_seed(seed: int, prompt_idx: int, model_idx: int, k: int) -> int:
    return zlib.crc32(f"{seed}/{prompt_idx}/{model_idx}/{k}".encode())


def png_bytes(img: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    to_pil(img).save(buf, format="PNG")
    return buf.getvalue()


def shard_path(out: Path, kind: str, j: int) -> Path:
    """Ranked lists at OUT/data-*.parquet; derived pairs at OUT/pairs/pairs-*.parquet (a dataset of its own)."""
    if kind == "pairs":
        (out / "pairs").mkdir(parents=True, exist_ok=True)
        return out / "pairs" / f"pairs-{j:05d}.parquet"
    return out / f"{kind}-{j:05d}.parquet"


def _pair_schema():
    import pyarrow as pa

    return pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                      ("label_0", pa.float64()), ("score_0", pa.float64()), ("score_1", pa.float64()),
                      ("margin", pa.float64())])


def _write_parquet(rows: list[dict], path: Path, schema=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    os.replace(tmp, path)


def ranks_from_scores(scores: list[float]) -> list[int]:
    """0 = best; ties share the better rank's order by index (stable)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    ranks = [0] * len(scores)
    for r, i in enumerate(order):
        ranks[i] = r
    return ranks


def pairs_from_list(row: dict, how: str, min_margin: float = 0.0) -> list[dict]:
    """Pick-a-Pic-schema pairs from a ranked row: best vs worst, or every ordered pair with a score gap."""
    s, imgs = row["scores"], row["images"]
    idx = list(range(len(s)))
    if how == "best-worst":
        best, worst = max(idx, key=lambda i: s[i]), min(idx, key=lambda i: s[i])
        cand = [(best, worst)] if s[best] > s[worst] and s[best] - s[worst] >= min_margin else []
    elif how == "all":
        cand = [(i, j) for i in idx for j in idx if s[i] > s[j] and s[i] - s[j] >= min_margin]
    else:
        raise ValueError(f"pairs={how!r}: expected best-worst or all")
    return [{"caption": row["prompt"], "jpg_0": imgs[i], "jpg_1": imgs[j], "label_0": 1.0,
             "score_0": s[i], "score_1": s[j], "margin": s[i] - s[j]} for i, j in cand]


def make_dataset(cfg: MakeDatasetConfig, rank: int = 0, world: int = 1, progress: bool = True) -> dict:
    """Generate, score and rank; returns counts. Safe to rerun after a kill: finished shards are kept."""
    from tqdm import tqdm

    from ..config import Component
    from ..data.prompts import read_prompts
    from ..models.load import default_guidance
    from ..registry import load_all
    from ..rewards.base import build_reward, ensemble_scores
    from ..train.setup import build_backbone, sampling_device

    load_all()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(cfg.prompts)
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    prompts = [p for p in prompts for _ in range(cfg.repeat_prompts)]
    if not prompts:
        raise ValueError(f"prompts={cfg.prompts!r}: no prompts found")
    from ..rewards.cache import CachedReward

    rewards = [parse_reward(r) for r in cfg.rewards]
    reward_fns = {name: CachedReward(build_reward({"name": name, **kw}), out / ".reward_cache.sqlite")
                  for name, _, kw in rewards}
    weights = {name: w for name, w, _ in rewards}
    models = [parse_model(m) for m in cfg.models]
    guidance = [cfg.guidance if cfg.guidance is not None else default_guidance(b, p) for b, p in models]
    provenance = {"models": [{"backbone": b, "path": p, "guidance": g} for (b, p), g in zip(models, guidance)],
                  "sampler": "ddim/flow-euler", "steps": cfg.steps, "guidance": cfg.guidance, "eta": cfg.eta,
                  "seed": cfg.seed,
                  "rewards": [{"name": n, "weight": w, "kwargs": kw, "version": reward_fns[n].version}
                              for n, w, kw in rewards],
                  "normalise": cfg.normalise, "images_per_prompt": cfg.images_per_prompt, "config": asdict(cfg)}
    if rank == 0:
        (out / "provenance.json").write_text(json.dumps(provenance, indent=2))
    n_shards = (len(prompts) + cfg.shard_size - 1) // cfg.shard_size
    mine = [j for j in range(n_shards) if j % world == rank and not shard_path(out, "data", j).exists()]
    rows_in = [min(cfg.shard_size, len(prompts) - j * cfg.shard_size) for j in mine]  # the last shard is short
    total_images = sum(rows_in) * cfg.images_per_prompt * len(models)
    bar = tqdm(total=total_images, desc=f"make-dataset[{rank}]", unit="img", disable=not progress,
               dynamic_ncols=True)
    from ..worlds.shapes.oracle import RenderPipeline

    backbones = [RenderPipeline() if b == "shapes-render" else build_backbone(Component(b, {"path": p}))
                 for b, p in models] if mine else []
    sizes = [bb.resolution for bb in backbones if not isinstance(bb, RenderPipeline)]
    for bb in backbones:
        if isinstance(bb, RenderPipeline) and sizes:
            bb.resize_to(max(sizes))  # one image size per row: the renderer follows the models
    for bb in backbones:
        if not isinstance(bb, RenderPipeline):  # the renderer draws on the CPU
            bb.to_device(sampling_device(), include_denoiser=True)
        bb.unwrapped().eval()
        bb.sample_dtype = torch.bfloat16 if cfg.bf16 else None
    t0, made = time.time(), 0
    for j in mine:
        ids = list(range(j * cfg.shard_size, min((j + 1) * cfg.shard_size, len(prompts))))
        images: dict[int, list[torch.Tensor]] = {i: [] for i in ids}
        sources: dict[int, list[str]] = {i: [] for i in ids}
        seeds: dict[int, list[int]] = {i: [] for i in ids}
        jobs = [(i, m, k) for m in range(len(models)) for i in ids for k in range(cfg.images_per_prompt)]
        for start in range(0, len(jobs), cfg.batch_size):
            chunk = jobs[start:start + cfg.batch_size]
            by_model: dict[int, list] = {}
            for job in chunk:
                by_model.setdefault(job[1], []).append(job)
            for m, part in by_model.items():
                bb = backbones[m]
                noise = torch.stack([torch.randn(bb.sample_shape, generator=torch.Generator().manual_seed(
                    image_seed(cfg.seed, i, m, k))) for i, _, k in part])
                with torch.no_grad():
                    res = bb.sample([prompts[i] for i, _, _ in part], steps=cfg.steps, guidance=guidance[m],
                                    latents=noise, eta=cfg.eta,
                                    generator=torch.Generator().manual_seed(image_seed(cfg.seed, j, m, start)))
                for (i, _, k), img in zip(part, res.images.cpu()):
                    images[i].append(img)
                    sources[i].append(f"{models[m][1]}#{image_seed(cfg.seed, i, m, k)}")
                    seeds[i].append(image_seed(cfg.seed, i, m, k))
                made += len(part)
                bar.update(len(part))
                bar.set_postfix(img_s=f"{made / max(time.time() - t0, 1e-9):.1f}")
        rows, pair_rows = [], []
        per_reward = {}
        flat_imgs = torch.stack([img for i in ids for img in images[i]])
        flat_prompts = [prompts[i] for i in ids for _ in images[i]]
        n_per = len(images[ids[0]])
        for name, fn in reward_fns.items():
            per_reward[name] = fn(flat_imgs, flat_prompts).float().view(len(ids), n_per)
        agg = ensemble_scores(per_reward, weights, cfg.normalise)
        for r, i in enumerate(ids):
            scores = agg[r].tolist()
            row = {"prompt": prompts[i], "prompt_index": i, "images": [png_bytes(im) for im in images[i]],
                   "scores": scores, "reward_scores": {n: per_reward[n][r].tolist() for n in per_reward},
                   "ranks": ranks_from_scores(scores), "sources": sources[i], "seeds": seeds[i]}
            rows.append(row)
            if cfg.pairs:
                pair_rows += pairs_from_list(row, cfg.pairs, cfg.min_margin)
        if cfg.pairs:
            # pairs first: the data shard's existence marks the whole shard as done
            _write_parquet(pair_rows, shard_path(out, "pairs", j), schema=_pair_schema())
        _write_parquet(rows, shard_path(out, "data", j))
    bar.close()
    return {"shards": n_shards, "written": len(mine), "images": made, "prompts": len(prompts),
            "seconds": time.time() - t0, "scored": {n: fn.calls for n, fn in reward_fns.items()}}
