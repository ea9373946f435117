"""What a model folder declares, read without loading a model: where a relative path points and the sampling
defaults in ``visalign_sampling.json``. Core (no model code), so config validation can fill in the guidance."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelLoadError

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLING_FILE = "visalign_sampling.json"  # a model folder's own sampling defaults: {"guidance": ..., "note": ...}
# a model folder's prediction target when it is not the scheduler's ε or v: {"target": "k", "k": ..., ...}
PARAMETERISATION_FILE = "visalign_parameterisation.json"


def resolve_path(path: str) -> str:
    """A relative model path is looked up from the working directory, then from the visalign checkout."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute() or not path.startswith(("assets", "./assets")):
        return path
    alt = REPO_ROOT / path
    return str(alt) if alt.exists() else path


def _declaration(path: str | None, name: str) -> tuple[Path | None, object]:
    """(the file, its JSON) of a declaration file in a model folder; (None, {}) when there is none."""
    f = Path(resolve_path(path)).expanduser() / name if path else None
    if f is None or not f.is_file():
        return None, {}
    try:
        return f, json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{f}: not valid JSON ({e})") from None


def declared_sampling(path: str | None) -> dict:
    """The sampling defaults a model folder declares in ``visalign_sampling.json`` ({} when it has none)."""
    f, data = _declaration(path, SAMPLING_FILE)
    if f is None:
        return {}
    if not isinstance(data, dict) or set(data) - {"guidance", "note"}:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ModelLoadError(f"{f}: expected a mapping with the keys guidance, note; found {found}")
    g = data.get("guidance")
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or g <= 0):
        raise ModelLoadError(f"{f}: guidance={g!r}: expected a positive number")
    return data


def default_guidance(backbone: str, path: str | None) -> float:
    """The guidance a model is sampled at unless told otherwise: its folder's declaration, else its family's."""
    from .registry import BACKBONES

    declared = declared_sampling(path).get("guidance")
    if declared is not None:
        return float(declared)
    return float(getattr(BACKBONES.get(backbone), "default_guidance", 3.0)) if backbone in BACKBONES else 3.0


def sampling_guidance(backbone, requested: float | None) -> float:
    """``requested`` when given, else the backbone's folder's declared guidance, else its family's usual one."""
    return requested if requested is not None else default_guidance(backbone.family, getattr(backbone, "path", None))


def declared_parameterisation(path: str | None) -> dict:
    """The k-Diff parameterisation a model folder declares ({} for the scheduler's own ε or v)."""
    f, data = _declaration(path, PARAMETERISATION_FILE)
    if f is None:
        return {}
    k = data.get("k") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("target") != "k" or isinstance(k, bool) or not isinstance(
            k, (int, float)) or not 0 <= k <= 2:
        raise ModelLoadError(f"{f}: expected {{\"target\": \"k\", \"k\": a number in [0, 2]}}, found {data!r}")
    return data
