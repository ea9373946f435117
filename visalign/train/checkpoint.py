"""accelerate checkpoints with the data cursor; ``resume=latest|PATH``."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from ..config import RunConfig
from ..errors import CheckpointError, first_line
from ..files import check_manifest, fsync_dir, fsync_tree, write_manifest


def save_checkpoint(acc, out: Path, step: int, nonfinite: tuple[int, int], ema=None, method_state: dict | None = None,
                    reference: dict | None = None, text_lora: dict | None = None,
                    write_lora: Callable[[Path], object] | None = None, previous: Path | None = None,
                    progress: dict | None = None) -> Path:
    """``accelerate.save_state`` (weights as safetensors, optimizer, scheduler, RNG) + the step cursor, the
    method's own state (JSON), when the reference has moved its weights (reference.safetensors), and a
    text-encoder LoRA's weights (text_lora.safetensors: accelerate holds only the denoiser), and ``progress``
    (the run's training seconds and pairs seen up to this step, so a resumed run's totals stay whole).

    ``write_lora`` (LoRA runs) also writes the adapter as a diffusers LoRA folder (step-N/lora), so any
    checkpoint can be sampled or evaluated like a finished run's ``lora`` (``--lora .../step-N/lora``).

    Durable and all-or-nothing: written under a temporary name, a manifest of every file's size and sha256
    written last, all of it fsynced, then renamed. A kill mid-save leaves the previous checkpoint as
    ``latest``; a write that fails (a full disk, a file-size limit) removes the partial copy and says what
    could not be written, with ``previous`` (the last good checkpoint) untouched.
    """
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    try:
        acc.save_state(str(tmp))
        if acc.is_main_process:
            _write_extras(tmp, step, nonfinite, ema, method_state, reference, text_lora, write_lora, progress)
            write_manifest(tmp)
            fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            fsync_dir(final.parent)
    except Exception as e:  # OSError, torch's RuntimeError, safetensors' SafetensorError: all a failed write
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final} ({first_line(e)}); the previous checkpoint "
                              f"{previous or '(none)'} is intact: free space and rerun with train.resume=latest"
                              ) from None
    acc.wait_for_everyone()
    return final


def _write_extras(tmp: Path, step: int, nonfinite: tuple[int, int], ema, method_state, reference, text_lora,
                  write_lora, progress: dict | None = None) -> None:
    """Everything accelerate does not hold, as safetensors and JSON (never pickles)."""
    from safetensors.torch import save_file

    if ema is not None:
        save_file({f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(ema.shadow_params)},
                  str(tmp / "ema.safetensors"), metadata={"optimization_step": str(ema.optimization_step)})
    if reference is not None:
        save_file(reference, str(tmp / "reference.safetensors"))
    if text_lora is not None:
        save_file(text_lora, str(tmp / "text_lora.safetensors"))
    if write_lora is not None:
        write_lora(tmp / "lora")
    state = {"step": step, "nonfinite": nonfinite[0], "nonfinite_skipped": nonfinite[1]}
    state |= {"method": method_state} if method_state else {}
    state |= {"progress": progress} if progress else {}
    (tmp / "visalign_state.json").write_text(json.dumps(state))


def checkpoint_problem(ckpt: Path) -> str | None:
    """None for a complete checkpoint; else what is wrong with it, naming the file. A checkpoint from before
    manifests (no manifest.json) is complete when its visalign_state.json, written last, is there."""
    if not (ckpt / "visalign_state.json").exists():
        return f"{ckpt / 'visalign_state.json'} is missing"
    if not (ckpt / "manifest.json").exists():
        return None
    return check_manifest(ckpt)


def checkpoint_step(ckpt: Path) -> int:
    try:
        return int(json.loads((ckpt / "visalign_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"train.resume: {ckpt / 'visalign_state.json'} cannot be read; resume from an "
                              "earlier checkpoints/step-N folder") from None


def checkpoint_progress(ckpt: Path) -> dict:
    """The run's training seconds and pairs seen up to a checkpoint (zeros for one written before checkpoints
    kept them). Read after load_checkpoint, which has already refused an unreadable visalign_state.json."""
    progress = json.loads((ckpt / "visalign_state.json").read_text()).get("progress", {})
    return {"seconds": float(progress.get("seconds", 0.0)), "pairs_seen": int(progress.get("pairs_seen", 0))}


def find_resume(resume: str, out: Path) -> Path | None:
    """Which checkpoint to resume from.

    ``''`` -> None (a fresh run); ``latest`` -> the newest complete checkpoint under out/checkpoints, and an
    error when there is none (a user who asks to resume expects to); ``latest_or_new`` -> the newest, or
    None to start fresh when there is no checkpoint at all (for jobs that are restarted blindly); anything
    else -> that checkpoint folder, which must be complete.

    The newest checkpoint is checked against its manifest: a torn or altered one is passed over with one
    printed line naming the file, for the previous complete one; when none is complete, one error.
    """
    if not resume:
        return None
    if resume in ("latest", "latest_or_new"):
        found = sorted(p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
        if not found and resume == "latest":
            raise CheckpointError(f"train.resume=latest: no checkpoint under {out / 'checkpoints'}; check "
                                  "train.output_dir, or pass train.resume=latest_or_new to start fresh when none "
                                  "exists")
        problems = []
        for ckpt in reversed(found):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                return ckpt
            problems.append(problem)
            print(f"train.resume={resume}: passing over {ckpt.name}, which is incomplete ({problem})",
                  file=sys.stderr)
        if found:
            raise CheckpointError(f"train.resume={resume}: no complete checkpoint under {out / 'checkpoints'} "
                                  f"(newest: {problems[0]}); start afresh in another train.output_dir")
        return None
    p = Path(resume)
    if not (p / "visalign_state.json").exists():
        raise CheckpointError(f"train.resume={resume!r}: not a visalign checkpoint (no visalign_state.json); "
                              "pass latest, latest_or_new or a checkpoints/step-N folder")
    problem = checkpoint_problem(p)
    if problem is not None:
        raise CheckpointError(f"train.resume={resume!r}: the checkpoint is incomplete ({problem}); pass an "
                              "earlier checkpoints/step-N folder or train.resume=latest")
    return p


def load_checkpoint(acc, ckpt: Path, ema=None, method=None, backbone=None) -> tuple[int, tuple[int, int]]:
    """Restore weights, optimizer, scheduler, RNG (and EMA, the method's state, a moved reference); returns
    (step, (non-finite steps in a row, non-finite steps skipped in all)). One error if unreadable."""
    try:
        acc.load_state(str(ckpt))
        state = json.loads((ckpt / "visalign_state.json").read_text())
        if ema is not None:
            load_ema(ema, ckpt)
        if method is not None:
            method.load_state_dict(state.get("method", {}))
        if backbone is not None and (ckpt / "reference.safetensors").exists():
            from safetensors.torch import load_file

            backbone.restore_reference(load_file(str(ckpt / "reference.safetensors")))
        if backbone is not None and (ckpt / "text_lora.safetensors").exists():
            from safetensors.torch import load_file

            from ..models.lora import restore_text_lora

            restore_text_lora(backbone, load_file(str(ckpt / "text_lora.safetensors")))
        return int(state["step"]), (int(state["nonfinite"]), int(state.get("nonfinite_skipped", 0)))
    except Exception as e:  # a truncated or foreign file: safetensors, torch, JSON and key errors alike
        raise CheckpointError(f"train.resume: checkpoint {ckpt} cannot be read ({first_line(e)}); resume from "
                              "an earlier checkpoints/step-N folder or delete this one") from None


def load_ema(ema, ckpt: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(ckpt / "ema.safetensors"), "pt") as f:
        ema.optimization_step = int(f.metadata()["optimization_step"])
        for i, p in enumerate(ema.shadow_params):
            p.data.copy_(f.get_tensor(f"shadow.{i}"))


# settings a resumed run may change: they do not alter what the weights are trained on or how
RESUMABLE_CHANGES = {"train.resume", "train.output_dir", "train.steps", "train.threads", "train.save_every",
                     "train.log_every", "train.tracker", "train.max_nonfinite", "train.on_nonfinite",
                     "train.validation_prompts", "train.validation_every"}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def check_same_run(config: dict, out: Path, resuming: bool) -> None:
    """A run folder holds one run: resuming with other settings, or starting afresh over a run that saved
    checkpoints, is refused (naming what differs) instead of mixing two runs' weights and logs."""
    import yaml

    saved_file = out / "config.yaml"
    has_run = any((out / "checkpoints").glob("step-*")) or (out / "summary.json").exists()
    if not resuming:
        if has_run:
            raise CheckpointError(f"train.output_dir={str(out)!r} already holds a run; pass train.resume=latest to "
                                  "continue it, or choose another train.output_dir")
        return
    if not saved_file.exists():
        return
    try:
        saved = _flatten(yaml.safe_load(saved_file.read_text()) or {})
    except yaml.YAMLError:
        return
    now = _flatten(config)
    # a setting newer than the saved run (a visalign upgrade between the kill and the resume) left at its
    # default changes nothing that run did: not a difference
    defaults = _flatten(json.loads(json.dumps(RunConfig().to_dict())))
    differs = [f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
               if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)
               and not (k not in saved and k in defaults and now.get(k) == defaults[k])]
    if differs:
        raise CheckpointError(f"train.resume: {out} was trained with other settings ({'; '.join(differs[:4])}"
                              f"{'; ...' if len(differs) > 4 else ''}); resume with the same settings or choose "
                              "another train.output_dir")
