"""Preference data streamed from a hub dataset (``data.streaming=true``): nothing is downloaded or read ahead.

Rows arrive in the stream's order (``datasets`` streaming, an IterableDataset). Every ``chunk_rows`` usable
rows (ties dropped, corrupt rows skipped) are encoded once (latent moments and text conditioning, as the
cache does) and written as one chunk of the stream's cache: ``chunk-NNNNNN.safetensors`` plus its
``.json`` (prompts and where in the raw stream the chunk ends), both renamed into place. Micro-step m of
rank r takes usable rows [(m·world + r)·B, +B); at the stream's end the next epoch starts over, so a
micro-step's rows are a pure function of m and exact resume needs only the step count. A resumed run
reads the chunks already cached and reopens the stream after the last one (``IterableDataset.skip``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .cache import backbone_fingerprint, collate_cached, encode_batch
from .pairs import LIST_COLUMNS, PAIR_COLUMNS, DataError, collate, prepare_row

log = logging.getLogger(__name__)


def open_stream(path: str, split: str = "train"):
    """A ``datasets`` IterableDataset over a parquet file or folder, a hub-layout folder or a hub id."""
    import datasets

    p = Path(path).expanduser()
    try:
        if p.is_file() and p.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(p), split="train", streaming=True)
        if p.is_dir() and sorted(p.glob("*.parquet")):
            files = [str(f) for f in sorted(p.glob("*.parquet"))]
            return datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
        return datasets.load_dataset(str(p) if p.is_dir() else path, split=split, streaming=True)
    except Exception as e:  # offline hub ids, unreadable folders
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"data.path={path!r}: could not stream it ({first}); pass a local parquet file or folder, "
                        "a hub-layout folder, or a hub dataset id while online") from None


class StreamedPairs:
    """Micro-batches from a streamed pairs (or lists) dataset, encoded chunk by chunk into the stream's cache."""

    streaming = True

    def __init__(self, path: str, backbone, cache_root: Path, split: str = "train", format: str = "pairs",
                 drop_ties: bool = True, max_rows: int = 0, batch_size: int = 8, rank: int = 0, world: int = 1,
                 chunk_rows: int = 64):
        self.path, self.backbone, self.split, self.format = path, backbone, split, format
        self.drop_ties, self.max_rows, self.chunk_rows = drop_ties, max_rows, chunk_rows
        self.batch_size, self.rank, self.world = batch_size, rank, world
        key = json.dumps([path, split, format, drop_ties, max_rows, chunk_rows, backbone_fingerprint(backbone)])
        self.dir = Path(cache_root) / ("stream-" + hashlib.sha1(key.encode()).hexdigest()[:16])
        self.dir.mkdir(parents=True, exist_ok=True)
        self.total: int | None = None  # usable rows in one epoch, once the stream has ended
        self._chunks: dict[int, dict] = {}
        self._iter, self._raw_pos = None, 0
        self.ties_dropped = self.corrupt_skipped = 0
        self.empty_text = None

    def _chunk_file(self, c: int) -> Path:
        return self.dir / f"chunk-{c:06d}.safetensors"

    def _read_rows(self, start_raw: int):
        """Usable rows from raw position ``start_raw`` on, as (raw position after the row, prepared row)."""
        if self._iter is None or self._raw_pos != start_raw:
            ds = open_stream(self.path, self.split)
            if self.max_rows:
                ds = ds.take(self.max_rows)
            self._iter, self._raw_pos = iter(ds.skip(start_raw) if start_raw else ds), start_raw
        for row in self._iter:
            self._raw_pos += 1
            missing = [c for c in (PAIR_COLUMNS if self.format == "pairs" else LIST_COLUMNS) if c not in row]
            if missing:
                raise DataError(f"{self.path}: missing column(s) {', '.join(missing)}; found: {', '.join(row)}")
            if self.format == "pairs" and self.drop_ties and float(row["label_0"]) == 0.5:
                self.ties_dropped += 1
                continue
            try:
                yield self._raw_pos, prepare_row(row, self._raw_pos - 1, self.format, self.backbone.resolution)
            except Exception as e:  # a corrupt image: skipped and counted, as in the map-style dataset
                self.corrupt_skipped += 1
                log.warning("skipping streamed row %d of %s: %s", self._raw_pos - 1, self.path, e)

    def _cached(self, c: int) -> dict | None:
        """Chunk c from memory or the cache folder (the last few stay in memory), else None."""
        if c not in self._chunks and self._chunk_file(c).exists():
            meta = json.loads(self._chunk_file(c).with_suffix(".json").read_text())
            self._chunks[c] = {"t": load_file(str(self._chunk_file(c))), **meta}
            while len(self._chunks) > 4:
                self._chunks.pop(next(iter(self._chunks)))
        return self._chunks.get(c)

    def _load(self, c: int) -> dict | None:
        """Chunk c from the cache, else from the stream, encoding every missing chunk before it first."""
        if (chunk := self._cached(c)) is not None:
            return chunk
        first = c
        while first > 0 and not self._chunk_file(first - 1).exists():
            first -= 1
        for k in range(first, c + 1):
            if self._encode_chunk(k) is None:
                return None
        return self._cached(c)

    def _encode_chunk(self, c: int) -> dict | None:
        start_raw = self._cached(c - 1)["raw_end"] if c > 0 else 0
        rows, raw_end = [], start_raw
        for position, row in self._read_rows(start_raw):
            raw_end = position
            rows.append(row)
            if len(rows) == self.chunk_rows:
                break
        if not rows:
            return None
        with torch.no_grad():
            tensors = encode_batch(self.backbone, collate(rows))
        meta = {"raw_end": raw_end, "prompts": [r["prompt"] for r in rows], "rows": len(rows)}
        tmp = self.dir / f".chunk-{c:06d}.{os.getpid()}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.with_suffix(".jsontmp").write_text(json.dumps(meta))
        os.replace(tmp.with_suffix(".jsontmp"), self._chunk_file(c).with_suffix(".json"))
        os.replace(tmp, self._chunk_file(c))  # the tensors last: a chunk exists only once both are in place
        self._chunks[c] = {"t": tensors, **meta}
        return self._chunks[c]

    def _row(self, i: int) -> dict:
        while True:
            if self.total is not None:
                i %= self.total
            c, j = divmod(i, self.chunk_rows)
            chunk = self._load(c)
            if chunk is not None and j < chunk["rows"]:
                return {"cached": True, **{k: v[j] for k, v in chunk["t"].items()}, "prompt": chunk["prompts"][j]}
            if self.total is not None:
                raise DataError(f"{self.path}: the stream has no usable rows")
            # the stream ended inside chunk c (a short chunk) or exactly before it
            self.total = c * self.chunk_rows + (chunk["rows"] if chunk is not None else 0)
            if self.total == 0:
                raise DataError(f"{self.path}: the stream has no usable rows (after dropping ties)")

    def batch(self, micro_step: int):
        start = (micro_step * self.world + self.rank) * self.batch_size
        return collate_cached([self._row(i) for i in range(start, start + self.batch_size)])

    def __len__(self) -> int:
        return self.total or 0

    def cached_rows(self) -> int:
        return sum(json.loads(f.read_text())["rows"] for f in self.dir.glob("chunk-*.json"))
