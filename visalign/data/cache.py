"""Precomputed latents (posterior mean and std) and text conditioning in safetensors shards.

The cache folder is keyed by a dataset fingerprint plus a backbone fingerprint, so a change of
data, resolution or encoders never reuses stale tensors. Training from a complete cache builds
the backbone without its VAE and text encoders. A cache is built in a staging folder private to its
process and published by renaming the whole folder, so two runs that share a cache (a sweep on one
machine) never see each other's half-written shards: the first to finish publishes, the other keeps
its copy's work out of the way and reads the published one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..models.backbone import Cond
from ..types import PreferenceBatch

SHARD_ROWS = 256
CACHE_FORMAT = "2"  # 2: the empty prompt's conditioning is cached beside the rows
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
TEXT_KEYS = ("hidden", "pooled")  # the parts of a Cond that come from the prompt's text (not, e.g., SDXL's time ids)


def backbone_fingerprint(backbone) -> str:
    """Family, weights location, resolution and the encoders' configs and file sizes."""
    h = hashlib.sha256()
    h.update(f"{backbone.family}|{getattr(backbone, 'path', '')}|{getattr(backbone, 'resolution', '')}".encode())
    root = Path(getattr(backbone, "path", ""))
    if root.is_dir():
        for sub in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2"):
            for f in sorted((root / sub).glob("*")) if (root / sub).is_dir() else ():
                h.update(f"{sub}/{f.name}:{f.stat().st_size}".encode())
                if f.suffix == ".json":
                    h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cache_root(root: str = "") -> Path:
    """Where caches live: ``data.cache_dir`` if set, else ``VISALIGN_CACHE``, else ~/.cache/visalign."""
    return Path(root) if root else Path(os.environ.get("VISALIGN_CACHE", Path.home() / ".cache" / "visalign"))


def cache_dir_for(dataset, backbone, root: str = "") -> Path:
    base = cache_root(root)
    key = hashlib.sha256(f"{CACHE_FORMAT}|{dataset.fingerprint}|{backbone_fingerprint(backbone)}".encode())
    key = key.hexdigest()[:20]
    return base / key


def is_complete(path: Path) -> bool:
    return (path / "index.json").exists()


def build_cache(backbone, dataset, path: Path, batch_rows: int = 16) -> Path:
    """Encode every usable row once into ``path``: latent moments [K, C, h, w] per row and the prompt's
    conditioning. Built in a private staging folder, then published with one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        _encode_into(backbone, dataset, staging, batch_rows)
        _publish(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _publish(staging: Path, path: Path) -> None:
    if path.exists() and not is_complete(path):
        shutil.rmtree(path, ignore_errors=True)  # a folder left by an interrupted build of an older version
    try:
        os.rename(staging, path)
    except OSError:
        if not is_complete(path):  # not "another process published first": a real failure
            raise


@torch.no_grad()
def _encode_into(backbone, dataset, path: Path, batch_rows: int) -> None:
    from .pairs import collate

    path.mkdir(parents=True)
    rows_meta: list[dict] = []
    buf: dict[str, list[torch.Tensor]] = {}
    shard, shards = 0, []

    def flush():
        nonlocal shard, buf
        if not buf:
            return
        name = f"shard-{shard:05d}.safetensors"
        save_file({k: torch.cat(v).contiguous() for k, v in buf.items()}, str(path / name))
        shards.append(name)
        shard, buf = shard + 1, {}

    for start in range(0, len(dataset), batch_rows):
        items = [dataset[i] for i in range(start, min(start + batch_rows, len(dataset)))]
        for i, it in zip(range(start, start + len(items)), items):
            if it is None:
                rows_meta.append({"index": i, "skipped": True})
        batch = collate(items)
        if batch is None:
            continue
        for key, v in encode_batch(backbone, batch).items():
            buf.setdefault(key, []).append(v)
        for it in items:
            if it is not None:
                rows_meta.append({"index": len(rows_meta), "row": it["row"], "prompt": it["prompt"],
                                  "shard": shard})
        if sum(len(v) for v in buf["mean"]) >= SHARD_ROWS:
            flush()
    flush()
    # the empty prompt's text conditioning, so prompt dropout works on cached rows (no text encoder then)
    empty = backbone.encode_prompts([""]).tensors
    save_file({k: empty[k].cpu().contiguous() for k in TEXT_KEYS if k in empty}, str(path / EMPTY_PROMPT_FILE))
    index = {"shards": shards, "rows": [r for r in rows_meta if not r.get("skipped")],
             "skipped": sum(1 for r in rows_meta if r.get("skipped")), "family": backbone.family}
    (path / "index.json").write_text(json.dumps(index))


def encode_batch(backbone, batch: PreferenceBatch) -> dict[str, torch.Tensor]:
    """A batch's cacheable tensors: latent moments [B, K, ...], text conditioning, labels, scores, image meta."""
    b, k = batch.images.shape[:2]
    mean, std = backbone.latent_moments(batch.images.flatten(0, 1).to(backbone.device))
    cond = backbone.encode_prompts(batch.prompts, batch.image_meta or None)
    tensors = {"mean": mean.view(b, k, *mean.shape[1:]).cpu()}
    if std is not None:
        tensors["std"] = std.view(b, k, *std.shape[1:]).cpu()
    tensors |= {f"cond.{n}": v.cpu() for n, v in cond.tensors.items()}
    tensors["label"] = batch.label
    if batch.scores is not None:
        tensors["scores"] = batch.scores
    for n, v in batch.image_meta.items():
        tensors[f"meta.{n}"] = v
    return tensors


class CachedDataset(torch.utils.data.Dataset):
    """Rows from a complete cache: the same rows, in the same order, as the dataset it was built from."""

    def __init__(self, path: Path, source=None):
        index = json.loads((path / "index.json").read_text())
        self.path, self.rows = path, index["rows"]
        tensors: dict[str, list[torch.Tensor]] = {}
        for name in index["shards"]:
            for k, v in load_file(str(path / name)).items():
                tensors.setdefault(k, []).append(v)
        self.t = {k: torch.cat(v) for k, v in tensors.items()}
        self.ties_dropped = getattr(source, "ties_dropped", 0)
        self.corrupt_skipped = index["skipped"]
        self.ds = getattr(source, "ds", None)
        empty = path / EMPTY_PROMPT_FILE
        self.empty_text = load_file(str(empty)) if empty.exists() else None
        if source is not None:
            self.rows_source = source.rows

    def __len__(self) -> int:
        return len(self.rows)

    def margins(self) -> torch.Tensor:
        if "scores" not in self.t:
            from .pairs import DataError

            raise DataError(f"{self.path}: score margins need score_0/score_1 columns in the data")
        return self.t["scores"][:, 0] - self.t["scores"][:, 1]

    @staticmethod
    def collate(items):
        return collate_cached(items)

    def __getitem__(self, i: int) -> dict:
        return {"cached": True, **{k: v[i] for k, v in self.t.items()}, "prompt": self.rows[i]["prompt"]}


def collate_cached(items: list[dict]) -> PreferenceBatch:
    t = {k: torch.stack([it[k] for it in items]) for k in items[0] if k not in ("cached", "prompt")}
    return PreferenceBatch(
        prompts=[it["prompt"] for it in items], label=t["label"], latent_mean=t["mean"], latent_std=t.get("std"),
        cond=Cond({k[5:]: v for k, v in t.items() if k.startswith("cond.")}), scores=t.get("scores"),
        image_meta={k[5:]: v for k, v in t.items() if k.startswith("meta.")})


def drop_prompts(batch: PreferenceBatch, rate: float, empty_text: dict | None) -> None:
    """Classifier-free-guidance prompt dropout: each row's prompt is blanked with probability ``rate``.

    With cached text conditioning the blanked rows' cached tensors are replaced by the empty prompt's
    (blanking only ``batch.prompts`` would change nothing the model sees).
    """
    keep = torch.rand(batch.size) >= rate
    batch.prompts = [p if k else "" for p, k in zip(batch.prompts, keep.tolist())]
    if batch.cond is None or bool(keep.all()):
        return
    if empty_text is None:
        from .pairs import DataError

        raise DataError("train.prompt_dropout needs the empty prompt's cached conditioning; this cache predates "
                        "it: delete the cache folder (data.cache_dir or VISALIGN_CACHE) to rebuild it")
    for key, value in empty_text.items():
        t = batch.cond.tensors[key]
        t[~keep.to(t.device)] = value.to(t)
