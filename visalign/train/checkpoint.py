"""accelerate checkpoints with the data cursor; ``resume=latest|PATH``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def save_checkpoint(acc, out: Path, step: int, nonfinite: int, ema=None) -> Path:
    """``accelerate.save_state`` (weights as safetensors, optimizer, scheduler, RNG) + the step cursor.

    Written under a temporary name and renamed, so a kill mid-save never leaves a half checkpoint
    that ``resume=latest`` would pick.
    """
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    if acc.is_main_process:
        if ema is not None:  # safetensors, not accelerate's pickled custom objects
            from safetensors.torch import save_file

            save_file({f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(ema.shadow_params)},
                      str(tmp / "ema.safetensors"), metadata={"optimization_step": str(ema.optimization_step)})
        (tmp / "visalign_state.json").write_text(json.dumps({"step": step, "nonfinite": nonfinite}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    acc.wait_for_everyone()
    return final


def find_resume(resume: str, out: Path) -> Path | None:
    """'' -> None; 'latest' -> newest complete checkpoint under out/checkpoints (or None); else that path."""
    if not resume:
        return None
    if resume == "latest":
        done = sorted(p for p in (out / "checkpoints").glob("step-*")
                      if not p.name.endswith(".tmp") and (p / "visalign_state.json").exists())
        return done[-1] if done else None
    p = Path(resume)
    if not (p / "visalign_state.json").exists():
        raise FileNotFoundError(f"train.resume={resume!r}: not a visalign checkpoint (no visalign_state.json)")
    return p


def load_ema(ema, ckpt: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(ckpt / "ema.safetensors"), "pt") as f:
        ema.optimization_step = int(f.metadata()["optimization_step"])
        for i, p in enumerate(ema.shadow_params):
            p.data.copy_(f.get_tensor(f"shadow.{i}"))
