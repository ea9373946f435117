"""The one training loop: ``loss = method(backbone, batch)`` on accelerate. It names no method, model family or
world: batches come from the source registered for the method's data kind (train/sources.py)."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..config import RunConfig, write_resolved
from ..data.cache import drop_prompts
from ..errors import UserError
from ..files import atomic_write_text, trim_jsonl
from ..models.lora import save_lora, text_lora_weights
from ..run_lock import hold_folder
from ..types import as_float
from .build import (
    build_lr_scheduler,
    build_method,
    build_optimizer,
    check_capabilities,
    check_data_format,
    prepare_trainable,
)
from .checkpoint import check_same_run, checkpoint_progress, find_resume, load_checkpoint, save_checkpoint
from .outputs import save_outputs, save_validation_grid
from .sources import data_source

log = logging.getLogger(__name__)


class NonFiniteError(UserError, RuntimeError):
    """Too many consecutive non-finite losses or gradients."""


@dataclass
class Run:
    """Everything one training run holds between steps."""

    cfg: RunConfig
    acc: object
    out: Path
    method: object
    backbone: object
    dataset: object
    stream: object
    params: list
    optimizer: object
    lr_sched: object
    ema: object | None
    resets: set[int]
    guard: object | None = None
    last_good: Path | None = None
    skipped: int = 0  # non-finite steps skipped (train.on_nonfinite=skip), over the whole run
    save_due: bool = False  # a checkpoint is due, waiting for the data source's next boundary
    # the run's totals: what the resumed checkpoint's steps took (progress before this process) plus this
    # process's own, so a resumed run's summary reports the compute of an uninterrupted run
    before: dict = field(default_factory=lambda: {"seconds": 0.0, "pairs_seen": 0})
    started: float = 0.0
    pairs_seen: int = 0

    def progress(self) -> dict:
        return {"seconds": self.before["seconds"] + time.time() - self.started,
                "pairs_seen": self.before["pairs_seen"] + self.pairs_seen}


def train(cfg: RunConfig) -> dict:
    """Run ``cfg`` to completion (resuming when asked); returns a summary dict written as summary.json.

    The run folder has one writer: a second run into it is refused while this one lives (run_lock)."""
    method = _checked_method(cfg)  # before any state or weights: a config mistake stops here
    acc, out = _accelerator(cfg)
    with hold_folder(out, "train.output_dir", enabled=acc.is_main_process):
        return _train(cfg, method, acc, out)


def _train(cfg: RunConfig, method, acc, out: Path) -> dict:
    from tqdm import tqdm

    t = cfg.train
    resume_dir = find_resume(t.resume, out)  # before anything loads: `resume=latest` with nothing to resume stops
    check_same_run(json.loads(json.dumps(cfg.to_dict())), out, resuming=resume_dir is not None)
    check_forward(t.steps, out, resume_dir)
    run = _build(cfg, acc, out, method)
    step, (nonfinite, run.skipped) = _resume(run, resume_dir)
    run.last_good = resume_dir
    bar = tqdm(total=t.steps, initial=step, desc="finetune", disable=not acc.is_main_process, dynamic_ncols=True)
    try:  # the bar is closed before any error is printed: the error stays the last line
        step = _steps(run, step, nonfinite, bar)
    finally:
        bar.close()
    acc.wait_for_everyone()
    return _finish(run, step)


def _steps(run: Run, step: int, nonfinite: int, bar) -> int:
    """Optimizer steps until train.steps: accumulate, update (or skip), log, evaluate and save."""
    t = run.cfg.train
    run.started, run.pairs_seen = time.time(), 0
    while step < t.steps:
        if step in run.resets:  # Curry-DPO: each stage starts from a reference equal to the policy
            run.backbone.freeze_reference_copy()
        window, seen = _accumulate(run, step)
        run.pairs_seen += seen
        finite, grad_norm = _update(run, window)
        nonfinite = 0 if finite else nonfinite + 1
        if not finite:
            _on_skipped(run, step, window, nonfinite, bar)
            continue
        step += 1
        bar.update(1)
        logs = {k: sum(w[k] for w in window) / len(window) for k in window[0] if k != "finite"}
        logs |= {"grad_norm": float(grad_norm), "lr": run.lr_sched.get_last_lr()[0],
                 "pairs_per_s": run.pairs_seen / max(time.time() - run.started, 1e-9)}
        logs |= {"nonfinite_skipped": run.skipped} if t.on_nonfinite == "skip" else {}
        _log(run, step, logs, bar)
        _evaluate_and_save(run, step, nonfinite)
    return step


def _on_skipped(run: Run, step: int, window: list[dict], in_a_row: int, bar) -> None:
    """A step whose update was dropped: a non-finite loss or gradient (stop, or skip and count, as
    train.on_nonfinite says), or a batch with no usable row (skipped); too many in a row stop the run."""
    t = run.cfg.train
    where = f"Last good checkpoint: {run.last_good or 'none (no checkpoint yet)'}"
    if window and t.on_nonfinite == "stop":
        run.acc.end_training()
        loss = next((w["loss"] for w in window if not w["finite"]), "finite")
        raise NonFiniteError(f"step {step + 1}: non-finite loss or gradient (loss {loss}); stopped with no update "
                             f"applied and no weights written. {where}; resume it with a lower train.lr or beta, or "
                             "pass train.on_nonfinite=skip to skip such steps")
    run.skipped += bool(window)
    why = "non-finite loss or gradient" if window else "no usable rows (all skipped, tied or corrupt)"
    log.warning("step %d: %s, update skipped (%d in a row)", step + 1, why, in_a_row)
    if in_a_row >= t.max_nonfinite:
        run.acc.end_training()
        raise NonFiniteError(f"{in_a_row} consecutive non-finite or empty steps at step {step + 1}; stopping. "
                             f"{where}. Try a lower train.lr or beta.")


def check_forward(steps: int, out: Path, resume_dir: Path | None) -> None:
    """Resume never moves a run backwards: train.steps below the checkpoint's step (or below a finished run's
    steps) would replace the weights trained further with earlier ones."""
    if resume_dir is None:
        return
    from .checkpoint import checkpoint_step

    done = checkpoint_step(resume_dir)
    finished = out / "summary.json"
    if finished.exists():
        try:
            done = max(done, int(json.loads(finished.read_text()).get("steps", 0)))
        except (ValueError, TypeError, AttributeError):
            pass
    if steps < done:
        raise UserError(f"train.steps={steps} is below the {done} steps {out} has already trained; resuming would "
                        f"move the run backwards. Pass train.steps>={done}, or evaluate an earlier checkpoint with "
                        "--lora .../checkpoints/step-N/lora")


def _accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    out = Path(t.output_dir)
    acc = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
                      log_with=None if t.tracker == "none" else t.tracker, cpu=not torch.cuda.is_available(),
                      project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    set_seed(t.seed)
    return acc, out


def _checked_method(cfg: RunConfig):
    from ..registry import BACKBONES

    method = build_method(cfg.objective, guidance=cfg.train.guidance)
    check_capabilities(method, BACKBONES.get(cfg.model.name))
    check_data_format(method, cfg)
    return method


def _build(cfg: RunConfig, acc, out: Path, method) -> Run:
    """Backbone, data, trainable parameters, batch stream, optimizer, schedule and EMA (in this order: the
    LoRA's random init comes after the data, as every checkpointed run was made)."""
    from .margin_plan import reference_resets

    t = cfg.train
    source = data_source(method)  # pairs, lists or online rounds: the method's data kind decides
    backbone, dataset = source.open(cfg, acc, method)
    params = prepare_trainable(backbone, cfg)
    groups = method.param_groups(backbone)  # a method's own modules (OFS-DPO's slow LoRA), at their own lr
    dataset, stream = source.batches(cfg, acc, method, backbone, dataset)
    optimizer = build_optimizer(params, cfg, groups)
    params = params + [p for g in groups for p in g["params"]]
    lr_sched = build_lr_scheduler(optimizer, cfg)
    if t.compiles():  # the compiled module shares the parameters: the optimizer and the LoRA see the same ones
        backbone.denoiser = torch.compile(backbone.denoiser)
    backbone.denoiser, optimizer, lr_sched = acc.prepare(backbone.denoiser, optimizer, lr_sched)
    backbone.to_device(acc.device)
    ema = None
    if t.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=t.ema_decay)
    return Run(cfg, acc, out, method, backbone, dataset, stream, params, optimizer, lr_sched, ema,
               reference_resets(cfg))


def _resume(run: Run, resume_dir: Path | None) -> tuple[int, tuple[int, int]]:
    """Load the checkpoint (if any), trim the logs to it, write the resolved config, start trackers."""
    acc, out, cfg = run.acc, run.out, run.cfg
    step, nonfinite = 0, (0, 0)
    if resume_dir is not None:
        step, nonfinite = load_checkpoint(acc, resume_dir, run.ema, run.method, run.backbone)
        run.before = checkpoint_progress(resume_dir)
        log.info("resumed from %s at step %d", resume_dir, step)
    if acc.is_main_process:  # logs continue from the resumed step: no torn line, no row logged twice
        for log_file in ("metrics.jsonl", "gold.jsonl"):
            trim_jsonl(out / log_file, lambda row: row.get("step", 0) <= step)
        write_resolved(cfg, out)  # after the resume has loaded: a failed resume rewrites nothing
        if cfg.train.tracker != "none":
            acc.init_trackers("visalign", config=_flat(cfg.to_dict()))
    if cfg.train.gold_reward and cfg.train.gold_every:
        from .guardrail import Guardrail

        run.guard = Guardrail(cfg, out)
    return step, nonfinite


def _accumulate(run: Run, step: int) -> tuple[list[dict], int]:
    """Forward and backward over the step's micro-batches; returns their metrics and the pairs seen."""
    from .margin_plan import pair_weights

    t, acc, window, seen = run.cfg.train, run.acc, [], 0
    for micro in range(t.grad_accum):
        batch = run.stream.batch(step * t.grad_accum + micro)
        if batch is None:
            continue
        batch = batch.to(acc.device)
        batch.weights = pair_weights(run.cfg, batch)
        with acc.accumulate(run.backbone.denoiser), acc.autocast():
            if t.prompt_dropout > 0:
                drop_prompts(batch, t.prompt_dropout, getattr(run.dataset, "empty_text", None))
            res = run.method(run.backbone, batch)
            if torch.isfinite(res.loss):
                acc.backward(res.loss)
            window.append({"loss": as_float(res.loss), **batch.log, **res.metrics,
                           "finite": bool(torch.isfinite(res.loss))})
        seen += batch.size * acc.num_processes
    return window, seen


def _update(run: Run, window: list[dict]) -> tuple[bool, torch.Tensor]:
    """Clip and step when every micro-batch and the gradient are finite; zero the gradients either way."""
    t = run.cfg.train
    if run.acc.num_processes > 1:  # DDP averages the denoiser's gradients; a text-encoder LoRA's, here
        for p in getattr(run.backbone, "text_params", ()):
            if p.grad is not None:
                p.grad = run.acc.reduce(p.grad, reduction="mean")
    grad_norm = run.acc.clip_grad_norm_(run.params, t.max_grad_norm) if t.max_grad_norm > 0 else \
        _grad_norm(run.params)
    finite = bool(window) and all(w["finite"] for w in window) and math.isfinite(float(grad_norm))
    if finite:
        run.optimizer.step()
        run.lr_sched.step()
        if run.ema is not None:
            run.ema.step(run.params)
    run.optimizer.zero_grad(set_to_none=True)
    return finite, grad_norm


def _log(run: Run, step: int, logs: dict, bar) -> None:
    t = run.cfg.train
    if step % t.log_every == 0 or step == t.steps or step == 1:
        run.acc.log(logs, step=step)
        if run.acc.is_main_process:
            with open(run.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")
        bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs.get('implicit_acc', float('nan')):.2f}")


def _evaluate_and_save(run: Run, step: int, nonfinite: int) -> None:
    """The guardrail's gold score, validation grids and checkpoints, each on its own schedule."""
    t = run.cfg.train
    if run.guard is not None and step % t.gold_every == 0:
        run.guard.evaluate(run.acc, run.backbone, step)
    if t.validation_every and t.validation_prompts and step % t.validation_every == 0:
        save_validation_grid(run.acc, run.backbone, run.cfg, step)
    run.save_due |= bool(t.save_every) and step % t.save_every == 0
    # a source whose batches depend on state a checkpoint does not hold (an online round in progress) has
    # its checkpoints at its own boundaries: a save that falls mid-round waits for the round's end
    if run.save_due and step < t.steps and getattr(run.stream, "at_boundary", lambda s: True)(step):
        run.save_due = False
        require_finite_weights(run, step)
        moved = any(r <= step for r in run.resets)
        run.last_good = save_checkpoint(run.acc, run.out, step, (nonfinite, run.skipped), run.ema,
                                        run.method.state_dict(), run.backbone.reference_weights() if moved else None,
                                        text_lora_weights(run.backbone),
                                        partial(save_lora, run.backbone) if run.cfg.lora.enabled else None,
                                        previous=run.last_good, progress=run.progress())


def require_finite_weights(run: Run, step: int) -> None:
    """No checkpoint or output ever holds a NaN or inf weight (an update is applied only when the loss and
    the gradient are finite, but the weights are checked where they are written, whatever caused it)."""
    bad = next((i for i, p in enumerate(run.params) if not bool(torch.isfinite(p.detach()).all())), None)
    if bad is not None:
        raise NonFiniteError(f"step {step}: trainable tensor {bad} holds non-finite values; nothing was written. "
                             f"Last good checkpoint: {run.last_good or 'none'}; resume it with a lower train.lr")


def _finish(run: Run, step: int) -> dict:
    acc = run.acc
    # seconds and pairs_seen are the run's (a resumed run's include its checkpoint's); this process's beside them
    summary = {"steps": step, "world_size": acc.num_processes, "rank": acc.process_index, **run.progress(),
               "seconds_this_process": time.time() - run.started, "pairs_seen_this_process": run.pairs_seen,
               "ties_dropped": run.dataset.ties_dropped,
               "corrupt_skipped": run.dataset.corrupt_skipped, "nonfinite_skipped": run.skipped}
    if run.ema is not None:
        run.ema.copy_to(run.params)
    require_finite_weights(run, step)
    summary["weights_sha256"] = weights_digest(run.params)
    if acc.is_main_process:
        summary |= save_outputs(run.backbone, run.cfg, run.out)
        if run.guard is not None:
            summary |= run.guard.finalise(run.out)
        atomic_write_text(run.out / "summary.json", json.dumps(summary, indent=2))
    acc.end_training()
    return summary


def weights_digest(params) -> str:
    """sha256 of the trainable weights' bytes: equal digests mean bit-identical weights (e.g. across ranks)."""
    import hashlib

    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.tensor(0.0)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _flat(v, key + ".")
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
