"""Syn-Pic-style ranked preference data: prompts -> K images per pipeline -> reward ensemble -> ranks.

Each shard holds a fixed slice of prompts and is written to a temporary name, then renamed: a
restart skips finished shards, so a kill at any moment leaves exactly one row per prompt.
Under ``accelerate launch`` each process takes every world-th shard.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UserError, require_positive
from ..images import to_pil
from ..seeds import derived_seed


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
    label_temperature: float = 0.0  # > 0: pairs labelled with Bradley-Terry noise on the score gap (a person's choice)
    max_prompts: int = 0
    repeat_prompts: int = 1  # each prompt this many times (different seeds)
    threads: int = 0
    bf16: bool = False  # sample under bf16 autocast
    overwrite: bool = False  # OUT holds a dataset made with other settings: delete it and start over

    def check(self, where: str = "make-dataset") -> None:
        for key in ("images_per_prompt", "steps", "batch_size", "shard_size", "repeat_prompts"):
            require_positive(getattr(self, key), f"{where}.{key}")
        for key in ("max_prompts", "threads", "eta", "min_margin", "label_temperature"):
            require_positive(getattr(self, key), f"{where}.{key}", allow_zero=True)
        if self.guidance is not None:
            require_positive(self.guidance, f"{where}.guidance", allow_zero=True)
        for key, allowed in (("normalise", ("zscore", "rank", "none")), ("pairs", ("", "best-worst", "all"))):
            value = getattr(self, key)
            if value not in allowed:
                raise UserError(f"{where}.{key}={value!r}: expected one of {', '.join(map(repr, allowed))}")
        if not self.models:
            raise UserError(f"{where}.models is empty: pass --model NAME=PATH (or a diffusers folder)")
        parse_rewards(self.rewards)


# settings that do not change what a dataset holds (everything else must match to continue one)
NOT_CONTENT = ("out", "threads", "overwrite")


def content_settings(cfg: MakeDatasetConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in NOT_CONTENT}


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
        value = float(weight) if weight else 1.0
    except ValueError:
        raise UserError(f"--reward {spec!r}: expected NAME[:WEIGHT][:key=value,...] with a numeric weight") from None
    if not name or not math.isfinite(value) or value < 0:
        raise UserError(f"--reward {spec!r}: expected NAME[:WEIGHT] with a reward name and a weight >= 0")
    return name, value, kwargs


def parse_rewards(specs: list[str]) -> list[tuple[str, float, dict]]:
    """Every ``--reward`` spec, checked before any model loads: known names, weights summing to > 0."""
    from ..registry import REWARDS, load_all

    if not specs:
        raise UserError("no reward: pass --reward NAME[:WEIGHT] (see `visalign list`)")
    load_all()
    parsed = [parse_reward(s) for s in specs]
    for (name, _, kwargs), spec in zip(parsed, specs):
        if name not in REWARDS:
            REWARDS.get(name)  # raises the did-you-mean ConfigError
        REWARDS.check_kwargs(name, kwargs, f"--reward {spec}")
    if sum(w for _, w, _ in parsed) <= 0:
        raise UserError(f"--reward {' '.join(specs)}: the weights sum to 0; give at least one a positive weight")
    return parsed


def parse_model(spec: str) -> tuple[str, str]:
    """'NAME=PATH', a diffusers folder, or the name of a registered model without weights (ShapesWorld's
    exact renderer, ``shapes-render``)."""
    from ..models.load import detect_backbone, resolve_path
    from ..registry import BACKBONES

    if "=" not in spec and not Path(spec).exists() and spec in BACKBONES and \
            getattr(BACKBONES.get(spec), "needs_weights", True) is False:
        return spec, spec
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name, resolve_path(path)
    path = resolve_path(spec)
    return detect_backbone(path), path


def image_seed(seed: int, prompt_idx: int, model_idx: int, k: int) -> int:
    return derived_seed(seed, prompt_idx, model_idx, k)


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


def pairs_from_list(row: dict, how: str, min_margin: float = 0.0, label_temperature: float = 0.0,
                    generator: torch.Generator | None = None) -> list[dict]:
    """Pick-a-Pic-schema pairs from a ranked row: best vs worst, or every ordered pair with a score gap.

    The higher-scored image stands first. ``label_temperature`` T > 0 labels like a person would:
    ``label_0`` = 1 with probability σ((s_0 − s_1) / T), else 0 (Bradley-Terry; the rater's docs give T
    for a chosen agreement rate); T = 0 always prefers the higher score.
    """
    from ..rewards.labels import bradley_terry_labels

    s, imgs = row["scores"], row["images"]
    idx = list(range(len(s)))
    if how == "best-worst":
        best, worst = max(idx, key=lambda i: s[i]), min(idx, key=lambda i: s[i])
        cand = [(best, worst)] if s[best] > s[worst] and s[best] - s[worst] >= min_margin else []
    elif how == "all":
        cand = [(i, j) for i in idx for j in idx if s[i] > s[j] and s[i] - s[j] >= min_margin]
    else:
        raise UserError(f"pairs={how!r}: expected best-worst or all")
    labels = [1.0] * len(cand)
    if cand and label_temperature > 0:
        labels = bradley_terry_labels(torch.tensor([s[i] for i, _ in cand]), torch.tensor([s[j] for _, j in cand]),
                                      label_temperature, generator).tolist()
    return [{"caption": row["prompt"], "jpg_0": imgs[i], "jpg_1": imgs[j], "label_0": label,
             "score_0": s[i], "score_1": s[j], "margin": s[i] - s[j]} for (i, j), label in zip(cand, labels)]


def refuse_other_settings(cfg: MakeDatasetConfig, out: Path, rank: int) -> None:
    """A dataset is a pure function of its settings: continuing one made otherwise is refused, naming what
    differs, unless ``overwrite`` (then rank 0 deletes it first)."""
    prov, shards = out / "provenance.json", sorted(out.glob("data-*.parquet"))
    if not prov.exists() and not shards:
        return
    try:
        old = json.loads(prov.read_text()).get("config") if prov.exists() else None
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        old = None
    new = content_settings(cfg)
    if old is None:
        differs = ["its provenance.json is missing or unreadable"]
    else:
        old = {k: v for k, v in old.items() if k not in NOT_CONTENT}
        differs = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k)]
    if not differs:
        return
    if not cfg.overwrite:
        raise UserError(f"--out {out}: holds a dataset made with other settings ({'; '.join(differs)}); "
                        "pass --overwrite to delete it and start over, or choose another --out")
    if rank == 0:
        for f in shards:
            f.unlink()
        shutil.rmtree(out / "pairs", ignore_errors=True)
        prov.unlink(missing_ok=True)


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _sample_shard(cfg: MakeDatasetConfig, j: int, ids: list[int], prompts: list[str], models, backbones, guidance,
                  bar, t0: float, made: list[int]):
    """Every image of shard j: K per prompt per model, each from its own recorded seed, in batches."""
    images: dict[int, list[torch.Tensor]] = {i: [] for i in ids}
    sources: dict[int, list[str]] = {i: [] for i in ids}
    seeds: dict[int, list[int]] = {i: [] for i in ids}
    jobs = [(i, m, k) for m in range(len(models)) for i in ids for k in range(cfg.images_per_prompt)]
    for start in range(0, len(jobs), cfg.batch_size):
        by_model: dict[int, list] = {}
        for job in jobs[start:start + cfg.batch_size]:
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
            made[0] += len(part)  # counted here: a disabled progress bar counts nothing
            bar.update(len(part))
            bar.set_postfix(img_s=f"{made[0] / max(time.time() - t0, 1e-9):.1f}")
    return images, sources, seeds


def _rank_shard(cfg: MakeDatasetConfig, ids: list[int], prompts: list[str], images, sources, seeds, reward_fns,
                weights) -> tuple[list[dict], list[dict]]:
    """Score, normalise per prompt, rank; the ranked rows and (with ``cfg.pairs``) the pairs derived from them."""
    from ..rewards.base import score_and_rank

    rows, pair_rows = [], []
    flat_imgs = torch.stack([img for i in ids for img in images[i]])
    flat_prompts = [prompts[i] for i in ids for _ in images[i]]
    agg, per_reward = score_and_rank(flat_imgs, flat_prompts, reward_fns, weights, len(images[ids[0]]),
                                     cfg.normalise)
    for r, i in enumerate(ids):
        scores = agg[r].tolist()
        row = {"prompt": prompts[i], "prompt_index": i, "images": [png_bytes(im) for im in images[i]],
               "scores": scores, "reward_scores": {n: per_reward[n][r].tolist() for n in per_reward},
               "ranks": ranks_from_scores(scores), "sources": sources[i], "seeds": seeds[i]}
        rows.append(row)
        if cfg.pairs:
            noise = torch.Generator().manual_seed(image_seed(cfg.seed, i, -1, 0))  # per prompt: resumable
            pair_rows += pairs_from_list(row, cfg.pairs, cfg.min_margin, cfg.label_temperature, noise)
    return rows, pair_rows


def make_dataset(cfg: MakeDatasetConfig, rank: int = 0, world: int = 1, progress: bool = True) -> dict:
    """Generate, score and rank; returns counts. Safe to rerun after a kill: finished shards are kept. One
    writer per --out (rank 0 holds it for the ranks of one launch); --out is never a model or prompt input."""
    from ..files import refuse_output_over_input
    from ..run_lock import hold_folder

    inputs = {"--prompts": cfg.prompts, **{f"--model {m}": m.split("=", 1)[-1] for m in cfg.models}}
    refuse_output_over_input(cfg.out, inputs, "--out")
    with hold_folder(cfg.out, "--out", enabled=rank == 0):
        return _make_dataset(cfg, rank, world, progress)


def _make_dataset(cfg: MakeDatasetConfig, rank: int, world: int, progress: bool) -> dict:
    from tqdm import tqdm

    from ..config import Component
    from ..data.prompts import read_prompts
    from ..models.load import build_backbone, default_guidance, ready_for_sampling
    from ..registry import load_all
    from ..rewards.base import build_reward, check_prompts

    load_all()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    rewards = parse_rewards(cfg.rewards)
    prompts = read_prompts(cfg.prompts, key="prompts")
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    prompts = [p for p in prompts for _ in range(cfg.repeat_prompts)]
    refuse_other_settings(cfg, out, rank)
    out.mkdir(parents=True, exist_ok=True)
    from ..rewards.cache import CachedReward

    reward_fns = {name: CachedReward(build_reward({"name": name, **kw}), out / ".reward_cache.sqlite", kw)
                  for name, _, kw in rewards}
    for fn in reward_fns.values():
        check_prompts(fn, prompts)  # e.g. `shapes` on a caption it cannot parse: before any image is sampled
    weights = {name: w for name, w, _ in rewards}
    models = [parse_model(m) for m in cfg.models]
    guidance = [cfg.guidance if cfg.guidance is not None else default_guidance(b, p) for b, p in models]
    provenance = {"models": [{"backbone": b, "path": p, "guidance": g} for (b, p), g in zip(models, guidance)],
                  "sampler": "ddim/flow-euler", "steps": cfg.steps, "guidance": cfg.guidance, "eta": cfg.eta,
                  "seed": cfg.seed,
                  "rewards": [{"name": n, "weight": w, "kwargs": kw, "version": reward_fns[n].version}
                              for n, w, kw in rewards],
                  "normalise": cfg.normalise, "images_per_prompt": cfg.images_per_prompt, "config": asdict(cfg)}
    if not (out / "provenance.json").exists():  # every rank: its shards never stand without it
        _write_json(provenance, out / "provenance.json")
    n_shards = (len(prompts) + cfg.shard_size - 1) // cfg.shard_size
    mine = [j for j in range(n_shards) if j % world == rank and not shard_path(out, "data", j).exists()]
    rows_in = [min(cfg.shard_size, len(prompts) - j * cfg.shard_size) for j in mine]  # the last shard is short
    total_images = sum(rows_in) * cfg.images_per_prompt * len(models)
    bar = tqdm(total=total_images, desc=f"make-dataset[{rank}]", unit="img", disable=not progress,
               dynamic_ncols=True)
    backbones = [build_backbone(Component(b, {"path": p})) for b, p in models] if mine else []
    sizes = [bb.resolution for bb in backbones if not hasattr(bb, "resize_to")]
    for bb in backbones:
        if hasattr(bb, "resize_to") and sizes:
            bb.resize_to(max(sizes))  # one image size per row: a renderer follows the models
    for bb in backbones:
        ready_for_sampling(bb, bf16=cfg.bf16)
    t0, made = time.time(), [0]
    for j in mine:
        ids = list(range(j * cfg.shard_size, min((j + 1) * cfg.shard_size, len(prompts))))
        images, sources, seeds = _sample_shard(cfg, j, ids, prompts, models, backbones, guidance, bar, t0, made)
        rows, pair_rows = _rank_shard(cfg, ids, prompts, images, sources, seeds, reward_fns, weights)
        if cfg.pairs:
            # pairs first: the data shard's existence marks the whole shard as done
            _write_parquet(pair_rows, shard_path(out, "pairs", j), schema=_pair_schema())
        _write_parquet(rows, shard_path(out, "data", j))
    bar.close()
    return {"shards": n_shards, "written": len(mine), "images": made[0], "prompts": len(prompts),
            "seconds": time.time() - t0, "scored": {n: fn.calls for n, fn in reward_fns.items()}}
