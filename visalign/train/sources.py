"""Where a run's batches come from, chosen by the method's ``data`` kind through ``DATA_SOURCES``.

- ``pairs`` / ``lists``: a preference dataset (Pick-a-Pic-schema pairs or ranked lists), read in
  deterministic epochs, streamed from the hub (``data.streaming``), or from the latent cache (``data.cache``);
- ``prompts``: online rounds (``objectives.online.RoundSource``): the method samples and scores its own data.

Each source opens in two phases because the order is part of every checkpointed run: the backbone and the
dataset first, then (after the LoRA's random init) the stream of micro-batches.
"""

from __future__ import annotations

import logging

import torch

from ..config import RunConfig
from ..models.load import bf16_is_emulated, build_backbone
from ..registry import DATA_SOURCES
from .build import BatchStream

log = logging.getLogger(__name__)


@DATA_SOURCES.register("pairs")
@DATA_SOURCES.register("lists")
class PreferenceSource:
    """A preference dataset: pairs or ranked lists, cached, streamed or in deterministic epochs."""

    def open(self, cfg: RunConfig, acc, method) -> tuple[object, object]:
        """The backbone and the dataset; with the cache on, a complete cache means no VAE or text encoder loads."""
        if cfg.data.streaming:
            return self._streamed(cfg, acc)
        from ..data.cache import CachedDataset, build_cache, cache_dir_for, is_complete

        t = cfg.train
        samples_during_training = bool(t.validation_every and t.validation_prompts) or bool(
            t.gold_reward and t.gold_every)
        needs_encoders = not cfg.data.cache or samples_during_training or cfg.lora.text_encoder
        backbone = build_backbone(cfg.model, load_encoders=needs_encoders)
        dataset = _dataset(cfg, backbone)
        if cfg.data.weighting != "none" or cfg.data.curriculum:
            _check_margins(cfg, dataset)  # score columns are needed: say so now, not at the first step
        if not cfg.data.cache:
            return backbone, dataset
        path = cache_dir_for(dataset, backbone, cfg.data.cache_dir)
        if not is_complete(path):
            if acc.is_main_process:
                encoder = backbone if needs_encoders else build_backbone(cfg.model)
                encoder.to_device(acc.device)
                build_cache(encoder, dataset, path)
                del encoder
            acc.wait_for_everyone()
        log.info("training from the cache at %s", path)
        return backbone, CachedDataset(path, dataset)

    @staticmethod
    def _streamed(cfg: RunConfig, acc) -> tuple[object, object]:
        from ..data.cache import cache_root
        from ..data.stream import StreamedPairs

        backbone = build_backbone(cfg.model)
        backbone.to_device(acc.device)
        d = cfg.data
        return backbone, StreamedPairs(d.path, backbone, cache_root(d.cache_dir), d.split, d.format, d.drop_ties,
                                       d.max_rows, cfg.train.batch_size, acc.process_index, acc.num_processes,
                                       d.stream_chunk_rows)

    def batches(self, cfg: RunConfig, acc, method, backbone, dataset) -> tuple[object, object]:
        """(dataset, stream): a streamed dataset is its own stream; otherwise seeded epochs (ordered, staged)."""
        from .margin_plan import pair_order, pair_stages, stage_steps

        if getattr(dataset, "streaming", False):
            return dataset, dataset
        t = cfg.train
        return dataset, BatchStream(dataset, t.batch_size, t.seed, acc.process_index, acc.num_processes,
                                    order=pair_order(cfg, dataset), stages=pair_stages(cfg, dataset),
                                    stage_micro_steps=stage_steps(cfg) * t.grad_accum)


@DATA_SOURCES.register("prompts")
class RoundsSource:
    """Online rounds: the method samples from the model being trained and scores what it drew."""

    def open(self, cfg: RunConfig, acc, method) -> tuple[object, object]:
        from ..data.prompts import training_prompts
        from ..objectives.online import PromptPool

        # the validation split (data.validation_fraction) is never drawn; tags None: PromptPool says the
        # source has none where task weights need them
        prompts, tags = training_prompts(cfg.data.path, cfg.data.validation_fraction, bool(cfg.data.task_weights))
        return build_backbone(cfg.model), PromptPool(prompts, tags, cfg.data.task_weights)

    def batches(self, cfg: RunConfig, acc, method, backbone, prompts) -> tuple[object, object]:
        from ..objectives.online import RoundSource

        t = cfg.train
        # the rounds' sampler, and the ratio methods' recomputed log-densities, in the rollouts' precision
        backbone.rollout_dtype = torch.bfloat16 if t.rollout_precision == "bf16" else None
        if backbone.rollout_dtype is not None and bf16_is_emulated(acc.device):
            log.warning("train.rollout_precision=bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX): "
                        "rollouts run many times slower than fp32 here; bf16 pays on GPUs and AMX CPUs")
        rounds = RoundSource(method, backbone, prompts, t.batch_size, t.grad_accum, t.seed, acc.process_index,
                             acc.num_processes)
        return rounds, rounds


def _check_margins(cfg: RunConfig, dataset) -> None:
    """Margin weighting and curricula read score columns: a dataset without them is refused naming the setting."""
    from ..data.pairs import DataError

    wants = f"data.weighting={cfg.data.weighting}" if cfg.data.weighting != "none" else "data.curriculum=true"
    try:
        dataset.margins()
    except DataError as e:
        raise DataError(f"{wants} needs score margins, but {e}; score the pairs first (`visalign score-pairs "
                        f"--data {cfg.data.path} --reward NAME`) or set data.weighting=none") from None


def _dataset(cfg: RunConfig, backbone):
    from ..data.pairs import PreferenceDataset

    d = cfg.data
    return PreferenceDataset(d.path, resolution=backbone.resolution, format=d.format, split=d.split,
                             drop_ties=d.drop_ties, on_error=d.on_error, hflip=d.hflip, max_rows=d.max_rows,
                             seed=cfg.train.seed)


def data_source(method):
    """The registered source for the method's data kind."""
    return DATA_SOURCES.get(method.data)()
