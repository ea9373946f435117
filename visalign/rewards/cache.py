"""Scores cached per (reward, version, prompt, image hash) in SQLite, so reruns never rescore an image."""

from __future__ import annotations

import hashlib
import math
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError


def image_key(image: Tensor, prompt: str) -> str:
    """sha1 of the image's uint8 pixels and shape plus the prompt: identical images share a key."""
    u8 = (image.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().contiguous()
    h = hashlib.sha1(u8.numpy().tobytes())
    h.update(str(tuple(u8.shape)).encode())
    h.update(prompt.encode())
    return h.hexdigest()


class CachedReward:
    """Wraps a reward; ``calls`` counts how many images the inner reward actually scored.

    A score is keyed by everything that changes it: the reward's name and version, the settings it was built
    with (``settings``: its arguments, a server's URL), the image's pixels and the prompt. A non-finite score
    is refused where it enters, never stored; a stored NULL (an older cache's NaN) is scored again."""

    def __init__(self, reward, path: str | Path, settings: dict | None = None):
        import json

        self.reward, self.name = reward, getattr(reward, "name", type(reward).__name__)
        self.version = getattr(reward, "version", "")
        if settings:
            self.version += "|" + json.dumps(settings, sort_keys=True, default=str)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=60)
        self.db.execute("CREATE TABLE IF NOT EXISTS scores (reward TEXT, version TEXT, key TEXT, score REAL, "
                        "PRIMARY KEY (reward, version, key))")
        self.db.commit()
        self.calls = 0

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        keys = [image_key(im, p) for im, p in zip(images, prompts)]
        found = dict(self.db.execute(
            f"SELECT key, score FROM scores WHERE reward=? AND version=? AND key IN ({','.join('?' * len(keys))})",
            [self.name, self.version, *keys]).fetchall()) if keys else {}
        found = {k: v for k, v in found.items() if v is not None and math.isfinite(v)}
        missing = [i for i, k in enumerate(keys) if k not in found]
        if missing:
            new = self.reward(images[missing], [prompts[i] for i in missing]).float().cpu()
            if len(new) != len(missing) or not bool(torch.isfinite(new).all()):
                raise UserError(f"reward {self.name!r} returned a score that is not a finite number (or "
                                f"{len(new)} scores for {len(missing)} images); nothing was cached")
            self.calls += len(missing)
            rows = [(self.name, self.version, keys[i], float(s)) for i, s in zip(missing, new)]
            self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)", rows)
            self.db.commit()
            found.update({keys[i]: float(s) for i, s in zip(missing, new)})
        return torch.tensor([found[k] for k in keys], dtype=torch.float32)
