"""Pick-a-Pic-schema pairs and Syn-Pic-style ranked lists as torch datasets of PreferenceBatch rows."""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError, spelled
from ..files import file_stamp
from ..types import PreferenceBatch

log = logging.getLogger(__name__)
PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
LIST_COLUMNS = ("prompt", "images", "scores")


class DataError(UserError):
    """Bad preference data: names the file, column or row and what was expected."""


def load_any(path: str, split: str = "train"):
    """A ``datasets.Dataset`` from a parquet file/folder, a save_to_disk folder, an image folder or a hub id."""
    import datasets

    p = Path(path).expanduser()
    if not path:
        raise DataError(f"data.path is empty: pass {spelled('data.path')}<parquet file or folder, or a dataset id>")
    try:
        if p.is_file() and p.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(p), split="train", cache_dir=_files_cache([p]))
        if p.is_dir():
            if (p / "dataset_info.json").exists() or (p / "state.json").exists():
                ds = datasets.load_from_disk(str(p))
                return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            files = sorted(str(f) for f in p.glob("*.parquet"))
            if files:
                return datasets.load_dataset("parquet", data_files=files, split="train",
                                             cache_dir=_files_cache([Path(f) for f in files]))
            if any(p.rglob("*.parquet")):  # the hub's own layout (data/train-*.parquet, README.md): its splits
                return datasets.load_dataset(str(p), split=split)
            return datasets.load_dataset("imagefolder", data_dir=str(p), split=split)
        if path.startswith((".", "/", "~")):
            raise DataError(f"{spelled('data.path')}{path!r}: no such file or folder")
        return datasets.load_dataset(path, split=split)
    except DataError:
        raise
    except Exception as e:  # offline hub ids, unreadable files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{spelled('data.path')}{path!r}: could not load it ({first}); pass a local parquet "
                        "file or folder, or a hub dataset id while online") from None


def _files_cache(files: list[Path]) -> str:
    """The datasets cache folder for these local files, keyed by each one's ``file_stamp``: ``datasets`` alone
    keys by path and mtime, so an in-place edit that kept size and mtime served old rows."""
    import hashlib

    from .cache import cache_root

    stamps = "\n".join(file_stamp(f.resolve()) for f in files)
    return str(cache_root() / "datasets" / hashlib.sha256(stamps.encode()).hexdigest()[:20])


def _image_paths(cell) -> list[str]:
    if isinstance(cell, str):
        return [cell]
    if isinstance(cell, dict) and not cell.get("bytes") and cell.get("path"):
        return [cell["path"]]
    if isinstance(cell, list):
        return [p for c in cell for p in _image_paths(c)]
    return []


def _image_files_stamp(ds, format: str) -> str:
    """Where image cells name files, a digest of each file's ``file_stamp``: a cache built while a file was
    corrupt (its row skipped) or different is not reused after the file is fixed. Empty where the images
    are embedded (their bytes are in the dataset's own fingerprint)."""
    import hashlib

    columns = ["jpg_0", "jpg_1"] if format == "pairs" else ["images"]
    columns = [c for c in columns if c in ds.column_names]
    if not len(ds) or not columns or not any(_image_paths(ds[0][c]) for c in columns):
        return ""
    h = hashlib.sha256()
    for c in columns:
        for cell in ds.with_format(None)[c]:
            for path in _image_paths(cell):
                try:
                    h.update(f"{file_stamp(path)}\n".encode())
                except OSError:
                    h.update(f"{path}|missing\n".encode())
    return "-files" + h.hexdigest()[:16]


def check_columns(ds, needed, path: str) -> None:
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found: {', '.join(ds.column_names)}")


def _regular_file(path: str) -> str:
    """An image path must name a regular file: a FIFO, a device or a folder would block or mislead the read."""
    import stat

    if not stat.S_ISREG(os.stat(path).st_mode):
        raise DataError(f"{path}: not a regular file (a FIFO, device or folder); an image cell names an image file")
    return path


def decode_image(value) -> Image.Image:
    """An RGB PIL image from bytes, a datasets Image dict, a PIL image or a path."""
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, dict):
        img = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(_regular_file(value["path"]))
    elif isinstance(value, (bytes, bytearray)):
        img = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        img = Image.open(_regular_file(value))
    else:
        raise DataError(f"cannot decode an image from {type(value).__name__}")
    img.load()
    return img.convert("RGB")


@dataclass
class Prepared:
    tensor: torch.Tensor  # [3, R, R] in [0, 1]
    original_size: tuple[int, int]  # (h, w) before resizing
    crop_top_left: tuple[int, int]


def prepare_image(img: Image.Image, resolution: int, flip: bool = False, center: bool = True) -> Prepared:
    """Resize the short side to ``resolution`` (bicubic), centre-crop a square, optional horizontal flip."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC) if (nw, nh) != (w, h) else img
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    if flip:
        arr = arr.flip(-1)
    return Prepared(arr, (h, w), (top, left))


class PreferenceDataset(torch.utils.data.Dataset):
    """Rows of pairs (winner first) or ranked lists, decoded and prepared for one backbone resolution."""

    def __init__(self, path: str, resolution: int, format: str = "pairs", split: str = "train",
                 drop_ties: bool = True, on_error: str = "skip", hflip: bool = False, max_rows: int = 0,
                 seed: int = 0):
        self.path, self.resolution, self.format = path, resolution, format
        self.on_error, self.hflip, self.seed = on_error, hflip, seed
        ds = load_any(path, split)
        check_columns(ds, PAIR_COLUMNS if format == "pairs" else LIST_COLUMNS, path)
        if max_rows:
            ds = ds.select(range(min(max_rows, len(ds))))
        self.ties_dropped = 0
        self.corrupt_skipped = 0
        if format == "pairs":
            labels = np.asarray(ds["label_0"], dtype=np.float64)
            bad = np.nonzero((labels < 0) | (labels > 1) | np.isnan(labels))[0]
            if len(bad):
                raise DataError(f"{path}: row {int(bad[0])}: label_0={labels[bad[0]]!r}, expected a value in [0, 1]")
            keep = np.ones(len(ds), dtype=bool)
            if drop_ties:
                keep = labels != 0.5
                self.ties_dropped = int((~keep).sum())
            self.rows = np.nonzero(keep)[0]
        else:
            self.rows = np.arange(len(ds))
        self.ds = ds
        # every option that changes which rows exist or what their pixels are: a cache built under other
        # options (e.g. on_error=skip, which drops corrupt rows) is never reused
        flips = f"hflip{seed}" if hflip else "noflip"
        self.fingerprint = (f"{getattr(ds, '_fingerprint', 'nofp')}-{format}-{resolution}-{drop_ties}-{max_rows}-"
                            f"{split}-{on_error}-{flips}{_image_files_stamp(ds, format)}")
        if self.ties_dropped:
            log.info("dropped %d tie rows (label_0 = 0.5) from %s", self.ties_dropped, path)

    def __len__(self) -> int:
        return len(self.rows)

    def margins(self) -> torch.Tensor:
        if "score_0" not in self.ds.column_names:
            raise DataError(f"{self.path}: score margins need score_0/score_1 columns")
        s0, s1 = np.asarray(self.ds["score_0"])[self.rows], np.asarray(self.ds["score_1"])[self.rows]
        labels = np.asarray(self.ds["label_0"])[self.rows]
        return torch.tensor(np.where(labels >= 0.5, s0 - s1, s1 - s0), dtype=torch.float32)

    @staticmethod
    def collate(rows):
        return collate(rows)

    def _flip(self, idx: int) -> bool:
        return self.hflip and bool(np.random.default_rng((self.seed, idx)).integers(2))

    def __getitem__(self, idx: int) -> dict | None:
        row_id = int(self.rows[idx])
        try:
            return prepare_row(self.ds[row_id], row_id, self.format, self.resolution, self._flip(idx))
        except Exception as e:
            if self.on_error == "raise":
                raise DataError(f"{self.path}: row {row_id}: corrupt image ({e})") from None
            self.corrupt_skipped += 1
            log.warning("skipping row %d of %s: corrupt image (%s)", row_id, self.path, e)
            return None


def prepare_row(row: dict, row_id: int, format: str, resolution: int, flip: bool = False) -> dict:
    """One pairs or list row decoded and prepared: winner first (a pair with label_0 < ½ is swapped)."""
    if format == "pairs":
        imgs = [decode_image(row["jpg_0"]), decode_image(row["jpg_1"])]
        p0 = float(row["label_0"])
        p = p0
        if p0 < 0.5:
            imgs, p = imgs[::-1], 1.0 - p0
        scores = None
        if "score_0" in row and "score_1" in row and row["score_0"] is not None:
            s = [float(row["score_0"]), float(row["score_1"])]
            scores = s if p0 >= 0.5 else s[::-1]
        prompt = row["caption"]
    else:
        imgs = [decode_image(v) for v in row["images"]]
        scores, p, prompt = [float(s) for s in row["scores"]], 1.0, row["prompt"]
    prepared = [prepare_image(im, resolution, flip) for im in imgs]
    return {"row": row_id, "prompt": prompt or "", "label": p,
            "images": torch.stack([q.tensor for q in prepared]),
            "scores": torch.tensor(scores, dtype=torch.float32) if scores is not None else None,
            "original_size": torch.tensor(prepared[0].original_size, dtype=torch.float32),
            "crop_top_left": torch.tensor(prepared[0].crop_top_left, dtype=torch.float32)}


def collate(rows: list[dict | None]) -> PreferenceBatch | None:
    """Stack rows into a PreferenceBatch; skipped (corrupt) rows are left out; None if all were skipped."""
    rows = [r for r in rows if r is not None]
    if not rows:
        return None
    scores = torch.stack([r["scores"] for r in rows]) if all(r["scores"] is not None for r in rows) else None
    return PreferenceBatch(
        prompts=[r["prompt"] for r in rows], label=torch.tensor([r["label"] for r in rows], dtype=torch.float32),
        images=torch.stack([r["images"] for r in rows]), scores=scores,
        image_meta={"original_size": torch.stack([r["original_size"] for r in rows]),
                    "crop_top_left": torch.stack([r["crop_top_left"] for r in rows])})
