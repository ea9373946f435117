"""Config trees from YAML files and ``key=value`` overrides: merging sections and applying dotted keys."""

from __future__ import annotations

from typing import Any

import yaml

from .coercion import Raw
from .registry import ConfigError

COMPONENT_SECTIONS = ("model", "objective")  # top-level sections that are components (a bare name is {name: ...})


def deep_merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, section by section; a section naming another component replaces it whole."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            if "name" in v and v.get("name") != out[k].get("name"):
                out[k] = dict(v)  # a new component name starts from its own defaults
            else:
                out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and raw.strip() and _looks_float(raw):
        value = float(raw)
    return key.strip().split("."), Raw(raw, value) if not isinstance(value, (dict,)) else value


def _looks_float(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        nxt = node.get(part)
        if isinstance(nxt, str) and (i > 0 or part in COMPONENT_SECTIONS):  # `objective.head=ipo` then `.tau`
            nxt = {"name": nxt}
        if nxt is None:
            nxt = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[:i + 1])} is not a section")
        node[part] = nxt
        node = nxt
    last = path[-1]
    if last == "name" and node.get("name") not in (None, value) and len(path) > 1:
        node.clear()  # `objective.name=grpo`: a new component starts from its own defaults, as in YAML merges
    if isinstance(node.get(last), dict) and "name" in node[last] and not isinstance(value, dict):
        node[last] = {"name": value}  # `objective.head=ipo` replaces the head with a fresh one
    else:
        node[last] = value
