"""Typed, strict run configs: defaults <- YAML (-c FILE) <- key=value overrides (dotted keys).

A component section is ``{name: ..., **kwargs}``; its kwargs are checked against the registered
class's signature before any weights load. Errors are one line naming the key, value and expectation.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .coercion import Raw, coerce, type_hints  # noqa: F401  (Raw: re-exported)
from .component_args import MAX_BATCH, check_known_ranges, is_reward_ensemble, reward_ensemble
from .errors import UserError, read_text, require_positive
from .overrides import apply_override, deep_merge, parse_override
from .registry import BACKBONES, HEADS, METHODS, PRESETS, REWARDS, ConfigError, Registry, closest

# a method/reward argument with one of these names is itself a component of that registry
NESTED: dict[str, Registry] = {"head": HEADS, "reward": REWARDS}  # component arguments that are components


@dataclass
class Component:
    """A registered component by name plus its constructor's keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name}
        for k, v in self.kwargs.items():
            out[k] = v.to_dict() if isinstance(v, Component) else v
        return out


# peft's init_lora_weights values that need no calibration data ("true": B = 0, the adapter starts as a no-op)
LORA_INITS = ("gaussian", "true", "false", "pissa", "olora", "orthogonal")


@dataclass
class LoraConfig:
    """LoRA on the denoiser (peft). ``enabled: false`` means full fine-tuning with a frozen reference copy."""

    enabled: bool = True
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    init: str = "gaussian"
    use_dora: bool = False  # DoRA (Liu et al. 2024): a learned magnitude per output column beside the LoRA
    rank_pattern: dict[str, int] = field(default_factory=dict)  # per-module ranks: {module regex or suffix: rank}
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # per-module alphas, likewise
    reference_dtype: str = "float32"  # full fine-tuning: dtype of the frozen reference copy
    text_encoder: bool = False  # LoRA on the CLIP text encoder(s) too; the reference is still 'adapters off'
    text_encoder_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])

    def check(self, where: str = "lora") -> None:
        require_positive(self.rank, f"{where}.rank")
        require_positive(self.alpha, f"{where}.alpha")
        _require_fraction(self.dropout, f"{where}.dropout")
        if str(self.init).lower() not in LORA_INITS:
            raise ConfigError(f"{where}.init={self.init!r}: expected one of {', '.join(LORA_INITS)}"
                              f"{closest(str(self.init), LORA_INITS)}")
        for key, value in {**self.rank_pattern, **self.alpha_pattern}.items():
            require_positive(value, f"{where}.rank_pattern/alpha_pattern[{key!r}]")
        if self.text_encoder and not self.enabled:
            raise ConfigError(f"{where}.text_encoder=true needs {where}.enabled=true (a text-encoder LoRA beside "
                              "the denoiser's)")
        if self.enabled and not self.targets:
            raise ConfigError(f"{where}.targets is empty: name the modules to adapt, e.g. to_q,to_k,to_v,to_out.0")


@dataclass
class DataConfig:
    """Preference data: Pick-a-Pic-schema pairs or ranked lists from anything ``datasets`` loads."""

    path: str = ""  # parquet file or folder, a save_to_disk folder, an image folder, or a hub id
    format: str = "pairs"  # pairs | lists
    split: str = "train"
    drop_ties: bool = True
    on_error: str = "skip"  # skip | raise: what a corrupt image row does
    hflip: bool = False
    max_rows: int = 0  # 0 = all
    cache: bool = True  # precompute latents and text embeddings (safetensors shards)
    cache_dir: str = ""  # default: <data path>/.visalign-cache or ~/.cache/visalign
    weighting: str = "none"  # none | margin | difficulty (needs score margins in the data)
    weight_scale: float = 1.0
    curriculum: bool = False  # easy-to-hard order by score margin (Curry-DPO)
    curriculum_stages: int = 1  # > 1: Curry-DPO's stages, each on its own chunk, the reference reset at each start
    streaming: bool = False  # stream it (hub ids, big folders): rows are read and cached as training reaches them
    stream_chunk_rows: int = 64  # streaming: rows encoded and cached together
    # online rounds: draw prompts by task, {task: weight} (a task not named weighs 1, 0 leaves it out); needs a
    # source with task tags (GenEval metadata's 'tag', a world's split); empty: uniformly over the prompts
    task_weights: dict[str, float] = field(default_factory=dict)
    # online rounds: hold back this fraction of data.path's prompts (per task, by a hash of the text) as a
    # validation split, never trained on; train.gold_prompts=validation scores checkpoints on it. 0 = off
    validation_fraction: float = 0.0

    def check(self, where: str = "data") -> None:
        if not (isinstance(self.validation_fraction, (int, float)) and 0 <= self.validation_fraction < 1):
            raise ConfigError(f"{where}.validation_fraction={self.validation_fraction!r}: expected a fraction "
                              "from 0 (off) to below 1")
        require_positive(self.max_rows, f"{where}.max_rows", allow_zero=True)
        require_positive(self.weight_scale, f"{where}.weight_scale")
        require_positive(self.curriculum_stages, f"{where}.curriculum_stages")
        require_positive(self.stream_chunk_rows, f"{where}.stream_chunk_rows")
        for task, w in self.task_weights.items():
            if not w >= 0:
                raise ConfigError(f"{where}.task_weights.{task}={w}: expected a weight >= 0")
        if self.streaming and (self.curriculum or self.weighting != "none"):
            raise ConfigError(f"{where}.streaming=true reads rows in stream order once: it cannot also order or "
                              f"weight them by margin ({where}.curriculum / {where}.weighting need the whole dataset)")
        if self.curriculum_stages > 1 and not self.curriculum:
            raise ConfigError(f"{where}.curriculum_stages={self.curriculum_stages} needs {where}.curriculum=true")


@dataclass
class TrainConfig:
    """The one training loop's settings (accelerate)."""

    output_dir: str = "runs/default"
    steps: int = 200
    batch_size: int = 8  # pairs (or lists) per process per micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    lr_schedule: str = "constant_with_warmup"  # any diffusers get_scheduler name
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes) | dct_adamw (low-rank DCT-projected states)
    optimizer_rank: int = 32  # dct_adamw: the rank r of each matrix's state subspace
    optimizer_update_gap: int = 50  # dct_adamw: steps between re-choosing the DCT columns
    mixed_precision: str = "no"  # no | bf16 | fp16
    # online rounds: fp32 | bf16 rollouts (bf16 autocast for the sampler and for the forwards that recompute a
    # ratio's log-densities, so π_θ = π_old before an update; pays on GPUs and AMX CPUs, 20x slower on AVX2)
    rollout_precision: str = "fp32"
    seed: int = 0
    save_every: int = 100  # accelerate save_state every N steps (0 = only at the end)
    log_every: int = 10
    resume: str = ""  # "" | latest | PATH of a checkpoint
    gradient_checkpointing: bool = False
    attention: str = "auto"  # auto (xformers when installed on GPU, else PyTorch SDPA) | sdpa | xformers
    # torch.compile of the denoiser: on | off | auto (on for runs of at least compile_min_steps steps, where the
    # start-up is paid back: docs/guide.md, "Compiling the denoiser", from scripts/bench_train.py's numbers)
    compile: str = "auto"
    compile_min_steps: int = 6000
    ema_decay: float = 0.0  # 0 = off; the final weights are the EMA weights
    prompt_dropout: float = 0.0  # papers used 0.2; off by default
    # a non-finite loss or gradient: stop (at the first, naming the step and the last good checkpoint) | skip
    # (the update is dropped and counted; max_nonfinite in a row still stop the run)
    on_nonfinite: str = "stop"
    max_nonfinite: int = 5  # consecutive skipped steps (non-finite under skip, or batches with no usable row)
    threads: int = 0  # torch threads per process; 0 = torch's default
    tracker: str = "tensorboard"  # tensorboard | wandb | none
    gold_reward: str = ""  # a registered reward held out from training, e.g. shapes; "" = off
    proxy_reward: str = ""  # the training signal's reward, plotted against gold
    gold_every: int = 0  # evaluate gold (and proxy) every N steps on fixed prompts and seeds
    # a prompt source (file, dataset or shapes:SPLIT), or "validation": data.validation_fraction's split of the
    # training prompts, scored per task (the held-out split then stays untouched until the final numbers)
    gold_prompts: str = "shapes:eval"
    gold_samples: int = 64  # images per evaluation (prompts cycled, fixed seeds)
    select_best: str = "last"  # last | gold: keep the weights with the best gold score as the final output
    validation_prompts: list[str] = field(default_factory=list)
    validation_every: int = 0  # 0 = off
    sample_steps: int = 20
    guidance: float | None = None  # None: what the model folder declares (visalign_sampling.json), else its family's

    def check(self, where: str = "train") -> None:
        for key in ("steps", "batch_size", "grad_accum", "lr", "log_every", "max_nonfinite", "gold_samples",
                    "sample_steps", "optimizer_rank", "optimizer_update_gap"):
            require_positive(getattr(self, key), f"{where}.{key}")
        for key in ("warmup_steps", "weight_decay", "max_grad_norm", "save_every", "gold_every", "threads",
                    "validation_every"):
            require_positive(getattr(self, key), f"{where}.{key}", allow_zero=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"{where}.seed={self.seed!r}: expected a whole number from 0 to 2**32 - 1")
        if self.batch_size > MAX_BATCH:
            raise ConfigError(f"{where}.batch_size={self.batch_size}: at most {MAX_BATCH} per process per micro-step "
                              f"(use {where}.grad_accum for larger effective batches)")
        _require_fraction(self.ema_decay, f"{where}.ema_decay")
        _require_fraction(self.prompt_dropout, f"{where}.prompt_dropout", closed=True)
        if self.guidance is not None:
            require_positive(self.guidance, f"{where}.guidance", allow_zero=True)
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"{where}.on_nonfinite={self.on_nonfinite!r}: expected stop or skip")
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"{where}.compile={self.compile!r}: expected auto, on or off")
        require_positive(self.compile_min_steps, f"{where}.compile_min_steps")

    def compiles(self) -> bool:
        """Whether this run compiles its denoiser: asked for, or long enough to pay the start-up back."""
        return self.compile == "on" or (self.compile == "auto" and self.steps >= self.compile_min_steps)


@dataclass
class RunConfig:
    """A finetune run: model, LoRA, objective, data and training settings."""

    model: Component = field(default_factory=lambda: Component("pixel", {"path": "assets/shapes-base"}))
    lora: LoraConfig = field(default_factory=LoraConfig)
    objective: Component = field(default_factory=lambda: Component("diffusion_dpo"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Component) else dataclasses.asdict(v)
        return out


def _require_fraction(value: float, key: str, closed: bool = False) -> None:
    """``value`` in [0, 1) (``closed``: [0, 1]), else a ConfigError naming ``key``."""
    require_positive(value, key, allow_zero=True)
    if value > 1 or (value == 1 and not closed):
        raise ConfigError(f"{key}={value!r}: expected a number in [0, {'1]' if closed else '1)'}")


COMPONENT_REGISTRIES: dict[str, Registry] = {"model": BACKBONES, "objective": METHODS}

def build_component(section: Any, registry: Registry, where: str) -> Component:
    """Validate ``{name, **kwargs}`` (or a bare name) against the registry entry's signature."""
    if isinstance(section, Component):
        section = section.to_dict()
    if isinstance(section, str):
        section = {"name": str(section)}
    if not isinstance(section, dict) or "name" not in section:
        raise ConfigError(f"{where}: expected a name or a mapping with 'name', got {section!r}")
    name = str(section["name"])
    entry = registry.get(name)
    kwargs = {k: v for k, v in section.items() if k != "name"}
    registry.check_kwargs(name, kwargs, where)
    hints = type_hints(entry)
    out: dict[str, Any] = {}
    params = registry.parameters(name)
    for k, v in kwargs.items():
        if k == "reward" and is_reward_ensemble(v):
            out[k] = reward_ensemble(v, f"{where}.{k}", build_component)
        elif k in NESTED:
            if isinstance(v, dict) and "name" not in v and isinstance(params[k].default, str):
                v = {"name": params[k].default, **v}  # `objective.head.tau=...` on the default head
            out[k] = build_component(v, NESTED[k], f"{where}.{k}")
        else:
            out[k] = coerce(v, hints.get(k, Any), f"{where}.{k}")
    check_known_ranges(out, where)
    return Component(name, out)


def section_from_dict(cls, data: dict, where: str):
    """A config dataclass from a mapping: unknown keys and wrong types refused, then the class's own ``check``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    obj = cls()
    for k, v in data.items():
        if k not in fields:
            raise ConfigError(f"unknown key {where}.{k}; valid keys: {', '.join(fields)}{closest(k, fields)}")
        setattr(obj, k, coerce(v, hints[k], f"{where}.{k}"))
    if hasattr(obj, "check"):
        obj.check(where)
    return obj


def read_yaml_mapping(file: str) -> dict:
    """A YAML config file's top-level mapping (safe loader: no Python tags), or one error naming the file."""
    if not Path(file).exists():
        raise ConfigError(f"config file {file} does not exist")
    try:
        data = yaml.safe_load(read_text(file, "config file")) or {}
    except UserError as e:
        raise ConfigError(str(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: not valid YAML ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a mapping of key: value at the top level, found a {type(data).__name__}")
    return data


def load_section(cls, files: list[str], values: dict, overrides: list[str], where: str):
    """One command's typed config: its YAML files <- its flags (``values``, None = not given) <- key=value."""
    data: dict = {}
    for f in files:
        data |= read_yaml_mapping(f)
    data |= {k: v for k, v in values.items() if v is not None}
    for item in overrides:
        path, value = parse_override(item)
        data[".".join(path)] = value
    return section_from_dict(cls, data, where)


def load_config(model: str | None = None, files: list[str] | None = None,
                overrides: list[str] | None = None) -> RunConfig:
    """Resolve a run config: preset for ``model`` <- each YAML file <- ``key=value`` overrides."""
    from .registry import load_all

    load_all()
    tree: dict = {}
    if model is not None:
        tree = PRESETS.get(model)()
    for f in files or []:
        tree = deep_merge(tree, read_yaml_mapping(f))
    for item in overrides or []:
        path, value = parse_override(item)
        apply_override(tree, path, value)
    return config_from_dict(tree)


def config_from_dict(tree: dict) -> RunConfig:
    cfg = RunConfig()
    valid = [f.name for f in dataclasses.fields(RunConfig)]
    for key, value in tree.items():
        if key not in valid:
            raise ConfigError(f"unknown key {key}; valid keys: {', '.join(valid)}{closest(key, valid)}")
        if key in COMPONENT_REGISTRIES:
            setattr(cfg, key, build_component(value, COMPONENT_REGISTRIES[key], key))
        else:
            section_cls = type(getattr(cfg, key))
            setattr(cfg, key, section_from_dict(section_cls, value, key))
    if "model" not in tree:
        cfg.model = build_component(cfg.model, BACKBONES, "model")
    if "objective" not in tree:
        cfg.objective = build_component(cfg.objective, METHODS, "objective")
    _check_choices(cfg)
    for section in (cfg.lora, cfg.data, cfg.train):
        section.check()
    if cfg.train.select_best == "gold" and not (cfg.train.gold_reward and cfg.train.gold_every):
        raise ConfigError("train.select_best=gold needs train.gold_reward=NAME and train.gold_every=N")
    if cfg.train.gold_prompts == "validation" and not cfg.data.validation_fraction:
        raise ConfigError("train.gold_prompts=validation needs data.validation_fraction=F (0 < F < 1), the "
                          "fraction of data.path's prompts to hold back for it")
    if cfg.model.kwargs.get("quantize", "none") != "none" and not cfg.lora.enabled:
        raise ConfigError(f"model.quantize={cfg.model.kwargs['quantize']}: a quantized base is frozen; train "
                          "adapters on it (lora.enabled=true), or fine-tune fully with model.quantize=none")
    samples_rounds = lambda name: getattr(METHODS.get(name), "data", "") == "prompts"  # noqa: E731
    online = samples_rounds(cfg.objective.name)
    if cfg.data.validation_fraction and not online:
        raise ConfigError(f"data.validation_fraction: objective {cfg.objective.name!r} trains on fixed data, not on "
                          "prompt rounds; hold back a validation split of its data before training instead")
    if cfg.train.rollout_precision != "fp32" and not online:
        rollers = [n for n in METHODS.names() if samples_rounds(n)]
        raise ConfigError(f"train.rollout_precision={cfg.train.rollout_precision}: objective "
                          f"{cfg.objective.name!r} samples no rollouts; it sets an online method's sampler "
                          f"({', '.join(rollers)})")
    for key in ("gold_reward", "proxy_reward"):
        name = getattr(cfg.train, key)
        if name:
            REWARDS.get(name)
    if cfg.train.guidance is None:
        from .model_folders import default_guidance

        cfg.train.guidance = default_guidance(cfg.model.name, cfg.model.kwargs.get("path"))
    return cfg


def _check_choices(cfg: RunConfig) -> None:
    choices = {("data", "format"): ("pairs", "lists"), ("data", "on_error"): ("skip", "raise"),
               ("data", "weighting"): ("none", "margin", "difficulty"),
               ("train", "mixed_precision"): ("no", "bf16", "fp16"),
               ("train", "rollout_precision"): ("fp32", "bf16"),
               ("train", "optimizer"): ("adamw", "adamw8bit", "dct_adamw"),
               ("train", "tracker"): ("tensorboard", "wandb", "none"),
               ("train", "attention"): ("auto", "sdpa", "xformers"), ("train", "select_best"): ("last", "gold")}
    for (sec, key), allowed in choices.items():
        v = getattr(getattr(cfg, sec), key)
        if v not in allowed:
            raise ConfigError(f"{sec}.{key}={v!r}: expected one of {', '.join(allowed)}{closest(v, allowed)}")


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def write_resolved(cfg: RunConfig, out_dir: str | Path) -> Path:
    """Write ``config.yaml`` (the resolved config) next to a run's outputs, atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "config.yaml.tmp"
    tmp.write_text(dump_config(cfg))
    tmp.replace(out / "config.yaml")
    return out / "config.yaml"
