"""The ``visalign eval ...`` commands' typed configs: the same mechanism as every other command.

Each is filled by ``load_section``: YAML files (``-c``), then the command's flags (``--model`` is the field
``model``), then ``key=value``; unknown keys and wrong types are refused, then ``check`` validates.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError, require_positive


@dataclass
class SamplingOptions:
    """What every command that generates shares: seed, sampler steps, guidance, threads, precision."""

    seed: int = 0
    steps: int = 20
    guidance: float | None = None  # None: what the model folder declares, else the family's usual
    threads: int = 0
    bf16: bool = False  # sample under bf16 autocast

    def check_sampling(self, where: str) -> None:
        require_positive(self.steps, f"{where}.steps")
        require_positive(self.threads, f"{where}.threads", allow_zero=True)
        if self.guidance is not None:
            require_positive(self.guidance, f"{where}.guidance", allow_zero=True)


def _require(cfg, where: str, *keys: str) -> None:
    for key in keys:
        if not getattr(cfg, key):
            raise UserError(f"{where}: pass --{key.replace('_', '-')} (or {key}=...)")


@dataclass
class GenevalConfig(SamplingOptions):
    """`eval geneval`: GenEval-style accuracy of a model (and LoRA) on a metadata file, fixed seeds."""

    model: str = ""
    backbone: str | None = None
    lora: str | None = None
    metadata: str = "shapes:eval"  # a .jsonl file, geneval (its 553 prompts) or a world's split
    samples_per_prompt: int = 4
    detector: str = "shapes"  # a registered detector (shapes, owlv2)
    owl: str = "google/owlv2-base-patch16-ensemble"
    clip_arch: str = "ViT-L-14"
    clip_pretrained: str = "openai"
    thresholds: str | None = None  # owlv2: the JSON `eval calibrate-detector` wrote ("" = GenEval's 0.3/0.9)
    per_task: int = 0  # 0 = every prompt; N = the first N prompts of each task
    out: str = ""

    def check(self, where: str = "eval geneval") -> None:
        _require(self, where, "model", "out")
        self.check_sampling(where)
        require_positive(self.samples_per_prompt, f"{where}.samples_per_prompt")
        require_positive(self.per_task, f"{where}.per_task", allow_zero=True)


@dataclass
class CalibrateConfig:
    """`eval calibrate-detector`: fit OWLv2's score thresholds on labelled images."""

    labels: str = ""
    owl: str = "google/owlv2-base-patch16-ensemble"
    out: str = ""

    def check(self, where: str = "eval calibrate-detector") -> None:
        _require(self, where, "labels", "out")


@dataclass
class FidConfig(SamplingOptions):
    """`eval fid`: FID of a model's samples against real images, with a pinned protocol."""

    model: str = ""
    backbone: str | None = None
    lora: str | None = None
    real: str = ""  # a world's renders (shapes:eval), an image folder, or a dataset
    n: int = 1000
    feature: str = "shapes"  # a registered feature net, or inception
    feature_weights: str | None = None
    inception_weights: str | None = None
    prompts: str = "shapes:eval"
    out: str = ""

    def check(self, where: str = "eval fid") -> None:
        _require(self, where, "model", "real", "out")
        self.check_sampling(where)
        require_positive(self.n, f"{where}.n")


@dataclass
class WinrateConfig(SamplingOptions):
    """`eval winrate`: a reward's win rate of a model over a baseline, same prompts and seeds."""

    model: str = ""
    lora: str | None = None
    baseline: str = ""
    baseline_lora: str | None = None
    backbone: str | None = None
    reward: str = ""  # NAME[:WEIGHT][:key=value,...]
    prompts: str = ""
    samples_per_prompt: int = 2
    out: str = ""

    def check(self, where: str = "eval winrate") -> None:
        _require(self, where, "model", "baseline", "reward", "prompts", "out")
        self.check_sampling(where)
        require_positive(self.samples_per_prompt, f"{where}.samples_per_prompt")
