"""Small named registries with a decorator, did-you-mean errors and signature checks."""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import json
import pkgutil
from collections.abc import Callable
from typing import Any

from .errors import UserError


class ConfigError(UserError):
    """A configuration problem, reported as one line naming the key, value or file."""


def first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def closest(name: str, options) -> str:
    match = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


class Registry:
    """A dict of name -> factory. ``@REG.register("name")`` adds one; ``REG.get(name)`` finds it."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def deco(obj: Callable) -> Callable:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            load_all()  # entries register when their module is imported: discover them before saying no
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._entries))}"
                              f"{closest(name, self._entries)}")
        return self._entries[name]

    def names(self) -> list[str]:
        load_all()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        if name not in self._entries:
            load_all()
        return name in self._entries

    def docs(self) -> dict[str, str]:
        return {n: first_doc_line(self._entries[n]) for n in self.names()}

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        sig = inspect.signature(self.get(name))
        return {k: p for k, p in sig.parameters.items()
                if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    def check_kwargs(self, name: str, kwargs: dict[str, Any], where: str) -> None:
        """Raise a one-line ConfigError if ``kwargs`` do not fit ``name``'s constructor."""
        params = self.parameters(name)
        for key in kwargs:
            if key not in params:
                raise ConfigError(f"unknown key {where}.{key} for {self.kind} {name!r}; valid keys: "
                                  f"{', '.join(params) or '(none)'}{closest(key, params)}")

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)


BACKBONES = Registry("backbone")
METHODS, HEADS, REWARDS = Registry("method"), Registry("head"), Registry("reward")
# What a world provides to generic code. By scheme ('NAME:SPEC', e.g. shapes:eval): PROMPT_SOURCES -> prompts;
# REAL_IMAGES -> real images [N, 3, H, W] uint8 (FID); REAL_FOR_PROMPTS -> fn(spec, prompts, gen, size, where),
# one real image of each prompt, [N, 3, size, size] in [0, 1] (DDO's real data; a captioned dataset's
# ``images:PATH`` too); METADATA_SOURCES -> GenEval metadata records. By name: DETECTORS -> a class with
# ``check_records(records, source)`` and ``objects(image, record)``; FID_FEATURES -> a class with
# ``load(weights) -> nn.Module`` (uint8 [N, 3, H, W] -> [N, D]), ``default_weights`` and ``resize`` (the protocol
# line written next to each FID); VOCABULARIES -> () -> the words its prompts use, in a fixed order (the tiny
# test models' tokenizers know every registered vocabulary).
PROMPT_SOURCES, REAL_IMAGES, METADATA_SOURCES = (Registry("prompt source"), Registry("real image source"),
                                                 Registry("metadata source"))
REAL_FOR_PROMPTS = Registry("prompt-matched real image source")
DETECTORS, FID_FEATURES, VOCABULARIES = Registry("detector"), Registry("FID feature net"), Registry("vocabulary")
# DATA_SOURCES: where the loop's batches come from, by the method's ``data`` kind (pairs | lists | prompts): a
# class with ``open(cfg, acc, method) -> (backbone, dataset)`` and ``batches(cfg, acc, method, backbone, dataset)
# -> (dataset, stream)``; a plug-in with a new kind of data registers its own. PRESETS: `visalign finetune NAME`
# -> a function returning the preset's config tree; each family (and world) registers its own with
# ``register_preset``.
DATA_SOURCES, PRESETS = Registry("data source"), Registry("model")


def register_preset(name: str, tree: dict) -> None:
    """Make ``tree`` (model / objective / train defaults) the preset ``name``; each use gets a fresh copy."""
    frozen = json.dumps(tree)
    PRESETS.register(name)(lambda: json.loads(frozen))


ALL = {"backbones": BACKBONES, "methods": METHODS, "heads": HEADS, "rewards": REWARDS}


# the packages whose modules register entries, found by walking them (nothing is listed by hand), and the
# entry-point group through which another package adds its own methods, heads, rewards or backbones
PLUGIN_PACKAGES = ("visalign.models", "visalign.objectives", "visalign.rewards", "visalign.data", "visalign.eval",
                   "visalign.worlds")
ENTRY_POINT_GROUP = "visalign.plugins"
_loaded = False


def load_all() -> None:
    """Import every module of the plugin packages and every ``visalign.plugins`` entry point, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package in PLUGIN_PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, package + "."):
            importlib.import_module(info.name)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()  # a module (or an object in one) that registers its entries when imported
        except Exception as e:  # a broken third-party plug-in is named, not a traceback deep in a command
            raise ConfigError(f"plug-in {entry.name!r} ({entry.value}, entry point group {ENTRY_POINT_GROUP}) "
                              f"failed to load: {type(e).__name__}: {e}") from None
