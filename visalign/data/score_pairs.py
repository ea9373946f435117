"""`visalign score-pairs`: reward scores for an existing pairs or ranked-list dataset (DiffusionDPO's
``--choice_model``, SmPO's preprocessing), optionally relabelling each pair by them.

The source rows are copied unchanged with ``score_0``/``score_1``/``margin`` added (pairs) or ``scores`` and
``ranks`` rewritten (lists, the source's scores kept as ``source_scores``). Each shard of ``shard_size`` source
rows is written to a temporary name and renamed, and every image score is cached in SQLite as it is
computed: a rerun after a kill keeps finished shards and rescoring nothing. Rerunning into the same
``--out`` with other settings is refused unless ``--overwrite``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UserError, require_positive
from .make_dataset import _write_json, _write_parquet, parse_rewards, ranks_from_scores
from .pairs import LIST_COLUMNS, PAIR_COLUMNS, check_columns, decode_image, load_any


@dataclass
class ScorePairsConfig:
    """Which dataset to score, with which rewards, and where to write the scored copy."""

    data: str = ""  # a parquet file or folder, a save_to_disk folder, a hub-layout folder or a hub id
    format: str = "pairs"  # pairs | lists
    split: str = "train"
    rewards: list[str] = field(default_factory=list)  # NAME[:WEIGHT][:key=value,...]
    out: str = ""
    normalise: str = "none"  # none | zscore | rank: per row, per reward, before the weighted mean
    relabel: bool = False  # pairs: label_0 from the scores (1 if s0 − s1 > tie_margin, 0 if < −tie_margin, else ½)
    tie_margin: float = 0.0
    shard_size: int = 256  # source rows per output shard
    max_rows: int = 0
    threads: int = 0
    overwrite: bool = False

    def check(self, where: str = "score-pairs") -> None:
        require_positive(self.shard_size, f"{where}.shard_size")
        for key in ("max_rows", "threads", "tie_margin"):
            require_positive(getattr(self, key), f"{where}.{key}", allow_zero=True)
        for key, allowed in (("format", ("pairs", "lists")), ("normalise", ("none", "zscore", "rank"))):
            if getattr(self, key) not in allowed:
                raise UserError(f"{where}.{key}={getattr(self, key)!r}: expected one of {', '.join(allowed)}")
        if not self.data:
            raise UserError("score-pairs: pass --data <pairs or ranked-list dataset>")
        if not self.out:
            raise UserError("score-pairs: pass --out <folder for the scored copy>")
        if self.relabel and self.format != "pairs":
            raise UserError("score-pairs: --relabel applies to pairs (--format pairs)")
        parse_rewards(self.rewards)


SETTINGS_NOT_CONTENT = ("out", "threads", "overwrite")


def _refuse_other_settings(cfg: ScorePairsConfig, out: Path) -> None:
    settings = {k: v for k, v in asdict(cfg).items() if k not in SETTINGS_NOT_CONTENT}
    prov = out / "provenance.json"
    if not prov.exists():
        return
    written = json.loads(prov.read_text())
    if "source" not in written:  # e.g. make-dataset's folder: its files are not score-pairs' to replace
        raise UserError(f"--out {out}: holds a dataset score-pairs did not write (its provenance.json is another "
                        "command's); choose another --out")
    old = written.get("config", {})
    differs = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]
    if not differs:
        return
    if not cfg.overwrite:
        raise UserError(f"--out {out}: holds scores made with other settings ({'; '.join(differs)}); pass "
                        "--overwrite to delete them and start over, or choose another --out")
    # only what score-pairs wrote goes: its shards, provenance and score cache; any other file stays
    for f in [*out.glob("pairs-*.parquet"), *out.glob("data-*.parquet"), out / ".reward_cache.sqlite", prov]:
        f.unlink(missing_ok=True)


def relabel(s0: float, s1: float, tie_margin: float) -> float:
    """P(image 0 preferred) from two scores: 1, 0, or ½ when they are within ``tie_margin``."""
    return 1.0 if s0 - s1 > tie_margin else 0.0 if s1 - s0 > tie_margin else 0.5


def _score_images(images: list[torch.Tensor], prompts: list[str], reward_fns: dict) -> dict[str, torch.Tensor]:
    """Every reward's score of each image; images of one size are scored together."""
    out = {name: torch.empty(len(images)) for name in reward_fns}
    by_shape: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(tuple(im.shape), []).append(i)
    for idx in by_shape.values():
        batch = torch.stack([images[i] for i in idx])
        for name, fn in reward_fns.items():
            out[name][idx] = fn(batch, [prompts[i] for i in idx]).float().cpu()
    return out


def _as_bytes(value) -> bytes:
    """An image cell as encoded bytes, whatever form ``datasets`` gave it (bytes, {'bytes': ...}, PIL)."""
    import io

    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and value.get("bytes"):
        return value["bytes"]
    buf = io.BytesIO()
    decode_image(value).save(buf, format="PNG")
    return buf.getvalue()


def _image(value) -> torch.Tensor:
    import numpy as np

    arr = np.asarray(decode_image(value), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def _score_shard(rows: list[dict], cfg: ScorePairsConfig, reward_fns: dict, weights: dict) -> list[dict]:
    from ..rewards.base import ensemble_scores

    pairs = cfg.format == "pairs"
    per_row = [[row["jpg_0"], row["jpg_1"]] if pairs else list(row["images"]) for row in rows]
    prompts = [row["caption"] if pairs else row["prompt"] for row in rows]
    flat = [_image(v) for vals in per_row for v in vals]
    flat_prompts = [p for p, vals in zip(prompts, per_row) for _ in vals]
    raw = _score_images(flat, flat_prompts, reward_fns)
    out, start = [], 0
    for row, vals in zip(rows, per_row):
        k = len(vals)
        per = {n: s[start:start + k].view(1, k) for n, s in raw.items()}
        scores = ensemble_scores(per, weights, cfg.normalise)[0].tolist()
        start += k
        row = dict(row)
        for col in ("jpg_0", "jpg_1") if pairs else ():
            row[col] = _as_bytes(row[col])
        if not pairs:
            row["images"] = [_as_bytes(v) for v in row["images"]]
        if pairs:
            row |= {"score_0": scores[0], "score_1": scores[1], "margin": scores[0] - scores[1]}
            if cfg.relabel:
                row["label_0"] = relabel(scores[0], scores[1], cfg.tie_margin)
        else:
            row |= {"source_scores": row.get("scores"), "scores": scores, "ranks": ranks_from_scores(scores)}
        row["reward_scores"] = json.dumps({n: s[0].tolist() for n, s in per.items()})
        out.append(row)
    return out


def score_pairs(cfg: ScorePairsConfig, progress: bool = True) -> dict:
    """Score every row; returns counts (``scored``: images the rewards actually scored in this run). --out
    is never --data (nor inside it, nor holding it), and has one writer at a time."""
    from ..files import refuse_output_over_input
    from ..run_lock import hold_folder

    cfg.check()
    refuse_output_over_input(cfg.out, {"--data": cfg.data}, "--out")
    with hold_folder(cfg.out, "--out"):
        return _score_pairs(cfg, progress)


def _score_pairs(cfg: ScorePairsConfig, progress: bool) -> dict:
    from tqdm import tqdm

    from ..rewards.base import build_reward, check_prompts
    from ..rewards.cache import CachedReward

    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rewards = parse_rewards(cfg.rewards)
    ds = load_any(cfg.data, cfg.split)
    check_columns(ds, PAIR_COLUMNS if cfg.format == "pairs" else LIST_COLUMNS, cfg.data)
    n = min(len(ds), cfg.max_rows) if cfg.max_rows else len(ds)
    out = Path(cfg.out)
    _refuse_other_settings(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    reward_fns = {name: CachedReward(build_reward({"name": name, **kw}), out / ".reward_cache.sqlite", kw)
                  for name, _, kw in rewards}
    prompt_col = "caption" if cfg.format == "pairs" else "prompt"
    for fn in reward_fns.values():
        check_prompts(fn, list(ds.select(range(n))[prompt_col]))
    weights = {name: w for name, w, _ in rewards}
    if not (out / "provenance.json").exists():
        _write_json({"source": cfg.data, "split": cfg.split, "rows": n, "config": asdict(cfg),
                     "rewards": [{"name": nm, "weight": w, "kwargs": kw, "version": reward_fns[nm].version}
                                 for nm, w, kw in rewards]}, out / "provenance.json")
    kind = "pairs" if cfg.format == "pairs" else "data"
    shards = [(j, range(s, min(s + cfg.shard_size, n))) for j, s in enumerate(range(0, n, cfg.shard_size))]
    todo = [(j, rows) for j, rows in shards if not (out / f"{kind}-{j:05d}.parquet").exists()]
    for j, rows in tqdm(todo, desc="score-pairs", unit="shard", disable=not progress):
        _write_parquet(_score_shard(list(ds.select(rows)), cfg, reward_fns, weights), out / f"{kind}-{j:05d}.parquet")
    return {"rows": n, "shards": len(shards), "written": len(todo), "out": str(out),
            "scored": {name: fn.calls for name, fn in reward_fns.items()}}
