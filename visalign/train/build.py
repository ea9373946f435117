"""Building a run's pieces from its config: backbone (LoRA or full), method, data stream, optimizer."""

from __future__ import annotations

import inspect
import logging

import numpy as np
import torch

from ..config import Component, RunConfig
from ..models.load import build_backbone, sampling_device  # noqa: F401  (re-exported: the loop's pieces)
from ..registry import DATA_SOURCES, METHODS, ConfigError

log = logging.getLogger(__name__)


def build_method(objective: Component, guidance: float | None = None):
    """The objective; a method that samples with ``guidance=None`` by default (D3PO) gets the run's
    ``guidance`` unless the config sets it: on-policy data is drawn the way the model will be sampled."""
    kwargs = {k: (v.to_dict() if isinstance(v, Component) else v) for k, v in objective.kwargs.items()}
    takes = inspect.signature(METHODS.get(objective.name)).parameters.get("guidance")
    if guidance is not None and "guidance" not in kwargs and takes is not None and takes.default is None:
        kwargs["guidance"] = guidance
    return METHODS.build(objective.name, **kwargs)


def check_data_format(method, cfg: RunConfig) -> None:
    need = method.data  # the built-in sources are registered by train.sources, which the loop imports
    if need not in DATA_SOURCES:
        raise ConfigError(f"method {cfg.objective.name} trains on {need!r}, for which no data source is registered")
    if need in ("pairs", "lists") and cfg.data.format != need:
        raise ConfigError(f"method {cfg.objective.name} trains on {need}; set data.format={need}")
    if need in ("pairs", "lists") and not cfg.data.path:
        raise ConfigError("data.path is empty: pass data.path=<a Pick-a-Pic-schema parquet file or folder (caption, "
                          "jpg_0, jpg_1, label_0)>, make-dataset's OUT/pairs (or OUT with data.format=lists), or a "
                          "hub dataset id with data.streaming=true, e.g. yuvalkirstain/pickapic_v2 (about 335 GB: "
                          "stream it)")


def check_capabilities(method, backbone_cls) -> None:
    """A method's optional needs (``invert``, ``step_logprob``) against the backbone class, before weights load."""
    for cap in method.needs:
        if not hasattr(backbone_cls, cap):
            raise ConfigError(f"method {type(method).__name__} needs backbone capability {cap!r}, "
                              f"which {backbone_cls.__name__} lacks")


def prepare_trainable(backbone, cfg: RunConfig) -> list[torch.nn.Parameter]:
    """LoRA adapters (reference = adapters off) or the whole denoiser (reference = frozen copy)."""
    from ..models.lora import LoraSpec, add_lora

    method_uses_ref = METHODS.get(cfg.objective.name).uses_reference  # a class attribute
    if cfg.lora.enabled:
        add_lora(backbone, LoraSpec(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                    targets=tuple(cfg.lora.targets), init=cfg.lora.init, use_dora=cfg.lora.use_dora,
                                    rank_pattern=cfg.lora.rank_pattern, alpha_pattern=cfg.lora.alpha_pattern))
    else:
        if method_uses_ref:
            backbone.freeze_reference_copy(getattr(torch, cfg.lora.reference_dtype))
        backbone.unwrapped().requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        backbone.unwrapped().enable_gradient_checkpointing()
    set_attention(backbone, cfg.train.attention)
    backbone.unwrapped().train()
    params = [p for p in backbone.unwrapped().parameters() if p.requires_grad]
    if cfg.lora.enabled and cfg.lora.text_encoder:
        from ..models.lora import add_text_encoder_lora

        backbone.text_params = add_text_encoder_lora(backbone, LoraSpec(
            rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
            targets=tuple(cfg.lora.text_encoder_targets), use_dora=cfg.lora.use_dora))
        params += backbone.text_params
    return params


def set_attention(backbone, attention: str) -> str:
    """PyTorch SDPA is diffusers' default; xformers only where it is installed and a GPU is present."""
    import importlib.util

    has_xformers = importlib.util.find_spec("xformers") is not None and torch.cuda.is_available()
    if attention == "xformers" and not has_xformers:
        raise ConfigError("train.attention=xformers needs the xformers package and a CUDA GPU; use sdpa")
    if attention == "xformers" or (attention == "auto" and has_xformers):
        backbone.unwrapped().enable_xformers_memory_efficient_attention()
        return "xformers"
    return "sdpa"


def build_optimizer(params, cfg: RunConfig, extra_groups: list[dict] | None = None):
    """The run's optimizer over ``params`` at train.lr, plus a method's own groups (``Method.param_groups``)
    at their ``lr_scale`` x train.lr (the schedule scales every group alike)."""
    t = cfg.train
    if extra_groups:
        params = [{"params": list(params)}] + [{"params": g["params"], "lr": t.lr * g.get("lr_scale", 1.0)}
                                               for g in extra_groups]
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "dct_adamw":
        from .dct_adamw import DCTAdamW

        return DCTAdamW(params, lr=t.lr, rank=t.optimizer_rank, update_gap=t.optimizer_update_gap,
                        weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def build_lr_scheduler(optimizer, cfg: RunConfig):
    from diffusers.optimization import get_scheduler

    try:
        return get_scheduler(cfg.train.lr_schedule, optimizer, num_warmup_steps=cfg.train.warmup_steps,
                             num_training_steps=cfg.train.steps)
    except ValueError as e:
        raise ConfigError(f"train.lr_schedule={cfg.train.lr_schedule!r}: {e}") from None


class BatchStream:
    """Deterministic micro-batches: micro-step i of rank r is a pure function of (seed, i, r).

    Indices come from concatenated per-epoch permutations; exact resume needs only the step count.
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 order: np.ndarray | None = None, stages: list[np.ndarray] | None = None, stage_micro_steps: int = 0):
        if len(dataset) == 0:
            raise ConfigError("the preference dataset has no usable rows (after dropping ties)")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world = rank, world
        self.order = order  # fixed order (curriculum) instead of shuffling
        # Curry-DPO stages: micro-steps [s·m, (s+1)·m) draw shuffled epochs of stage s's rows only
        self.stages, self.stage_micro_steps = stages, stage_micro_steps

    def _epoch(self, e: int, stage: int | None = None) -> np.ndarray:
        if stage is not None:
            chunk = self.stages[stage]
            return chunk[np.random.default_rng((self.seed, stage + 1, e)).permutation(len(chunk))]
        if self.order is not None:
            return self.order
        return np.random.default_rng((self.seed, e)).permutation(len(self.dataset))

    def indices(self, micro_step: int) -> list[int]:
        stage = None
        if self.stages:
            stage = min(micro_step // self.stage_micro_steps, len(self.stages) - 1)
            micro_step -= stage * self.stage_micro_steps
        n = len(self.dataset) if stage is None else len(self.stages[stage])
        gbs = self.batch_size * self.world
        start = micro_step * gbs + self.rank * self.batch_size
        return [int(self._epoch(pos // n, stage)[pos % n]) for pos in range(start, start + self.batch_size)]

    def batch(self, micro_step: int):
        return self.dataset.collate([self.dataset[i] for i in self.indices(micro_step)])
