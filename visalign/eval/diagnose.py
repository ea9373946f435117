"""`visalign diagnose RUN`: where in the denoiser alignment lives (in the spirit of SPINAL, for diffusion).

Per block of the denoiser (a UNet's down/mid/up blocks, a DiT's transformer blocks, in forward order):
- **weights**: the fine-tune's delta ΔW = W_tuned − W_base of every adapted layer (LoRA merged, or a full
  fine-tune's difference). Reported: ‖ΔW‖_F summed over the block; ‖ΔW‖_F/‖W‖_F; the top-1 spectral share
  σ₁²/Σσ² of ΔW (1 for a rank-one update, 1/r for a flat rank-r one); and the spectral contraction
  σ_max(W + ΔW)/σ_max(W) − 1 (negative: the block's largest gain shrank).
- **activations**: on fixed probe inputs (prompts, seeded noise, three noise levels), the relative change of
  the block's output ‖h_tuned − h_base‖/‖h_base‖ and its increment over the previous block (the shift that
  this block adds on top of what it received).

``random_adapter`` replaces a LoRA by a random one of the same total ‖ΔW‖_F: a control whose profile a
trained adapter should not share.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


def block_of(name: str, root: nn.Module) -> str:
    """The top-level block a parameter or module name belongs to: 'down_blocks.1', 'mid_block', 'conv_in' ..."""
    parts = name.split(".")
    child = getattr(root, parts[0], None)
    if isinstance(child, nn.ModuleList) and len(parts) > 1 and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def blocks_in_order(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Each top-level ModuleList element and each other direct child named like a block, in registration order."""
    out = []
    for name, child in root.named_children():
        if isinstance(child, nn.ModuleList):
            out += [(f"{name}.{i}", m) for i, m in enumerate(child)]
        elif "block" in name:
            out.append((name, child))
    return out


def _matrix(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().reshape(w.shape[0], -1)


def _effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every ≥2-D weight with LoRA adapters merged in, under the plain layer's name (``.base_layer`` dropped)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    m = copy.deepcopy(model)
    for module in m.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    return {n.replace(".base_layer.", "."): p.detach() for n, p in m.named_parameters()
            if p.dim() >= 2 and ".lora_" not in n}


def weight_profile(base: nn.Module, tuned: nn.Module) -> dict[str, dict]:
    """Per block: Σ‖ΔW‖_F, relative norm, mean top-1 spectral share and mean spectral contraction of ΔW."""
    base_w, tuned_w = _effective_weights(base), _effective_weights(tuned)
    acc: dict[str, dict] = {}
    for name, w in tuned_w.items():
        if name not in base_w:
            continue
        w0 = _matrix(base_w[name])
        delta = _matrix(w) - w0
        if float(delta.abs().max()) == 0.0:
            continue
        s = torch.linalg.svdvals(delta)
        s_base = float(torch.linalg.matrix_norm(w0, ord=2))
        row = acc.setdefault(block_of(name, tuned), {"delta_sq": 0.0, "base_sq": 0.0, "top1": [], "contraction": []})
        row["delta_sq"] += float((delta ** 2).sum())
        row["base_sq"] += float((w0 ** 2).sum())
        row["top1"].append(float(s[0] ** 2 / (s ** 2).sum()))
        row["contraction"].append(float(torch.linalg.matrix_norm(_matrix(w), ord=2)) / s_base - 1.0 if s_base else 0.0)
    return {b: {"delta_norm": math.sqrt(r["delta_sq"]),
                "relative_norm": math.sqrt(r["delta_sq"] / max(r["base_sq"], 1e-30)),
                "top1_share": sum(r["top1"]) / len(r["top1"]),
                "contraction": sum(r["contraction"]) / len(r["contraction"]), "layers": len(r["top1"])}
            for b, r in acc.items()}


def _block_outputs(backbone, model: nn.Module, probes: list[tuple]) -> dict[str, list[torch.Tensor]]:
    """Each block's first output on each probe, with ``model`` standing in as the backbone's denoiser."""
    outs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, block in blocks_in_order(model):
        def hook(_m, _i, out, name=name):
            first = out[0] if isinstance(out, (tuple, list)) else out
            outs.setdefault(name, []).append(first.detach().float().cpu())
        hooks.append(block.register_forward_hook(hook))
    own = backbone.denoiser
    backbone.denoiser = model
    try:
        with torch.no_grad():
            for x_t, t, cond in probes:
                backbone.predict(x_t, t, cond)
    finally:
        backbone.denoiser = own
        for h in hooks:
            h.remove()
    return outs


def probe_inputs(backbone, prompts: Sequence[str], draws: int = 3, seed: int = 0) -> list[tuple]:
    """Fixed probes: seeded stand-in clean samples, noised at seeded timesteps from the training density."""
    gen = torch.Generator().manual_seed(seed)
    cond = backbone.encode_prompts(list(prompts))
    probes = []
    for _ in range(draws):
        x0 = torch.randn((len(prompts), *backbone.sample_shape), generator=gen).to(backbone.device)
        noised = backbone.noise(x0, generator=gen)
        probes.append((noised.x_t, noised.t, cond))
    return probes


def activation_profile(backbone, base: nn.Module, tuned: nn.Module, probes: list[tuple]) -> dict[str, dict]:
    """Per block, in the order the blocks ran: mean relative output change tuned vs base on the probes, and its
    increment over the block that ran before it."""
    a, b = _block_outputs(backbone, base, probes), _block_outputs(backbone, tuned, probes)
    out, previous = {}, 0.0
    for name in a:
        rel = [float((y - x).norm() / x.norm().clamp_min(1e-12)) for x, y in zip(a[name], b[name])]
        shift = sum(rel) / len(rel)
        out[name] = {"activation_shift": shift, "shift_added": shift - previous}
        previous = shift
    return out


def random_adapter(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of a LoRA'd ``model`` whose adapters are random with the same total ‖ΔW‖_F as the trained ones."""
    rnd = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    layers = [m for m in rnd.modules() if "default" in getattr(m, "lora_A", {})]
    if not layers:
        raise ValueError("random_adapter: the model has no LoRA adapters")

    @torch.no_grad()
    def total() -> float:
        return math.sqrt(sum(float((m.lora_B["default"].weight.flatten(1) @ m.lora_A["default"].weight.flatten(1)
                                    * m.scaling["default"]).pow(2).sum()) for m in layers))

    target = total()
    with torch.no_grad():
        for m in layers:
            for lin in (m.lora_A["default"], m.lora_B["default"]):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen))
        factor = math.sqrt(target / max(total(), 1e-30))  # ΔW = B·A is bilinear: each factor scales by √k
        for m in layers:
            m.lora_A["default"].weight.mul_(factor)
            m.lora_B["default"].weight.mul_(factor)
    return rnd


def diagnose_models(backbone, base: nn.Module, tuned: nn.Module, prompts: Sequence[str]) -> dict:
    """Weight and activation profiles of ``tuned`` against ``base`` (same blocks), per block in forward order."""
    weights = weight_profile(base, tuned)
    acts = activation_profile(backbone, base, tuned, probe_inputs(backbone, prompts))
    order = list(acts)  # the order the blocks ran in (a UNet's mid block runs between its down and up blocks)
    order += [n for n, _ in blocks_in_order(tuned) if n not in acts]
    rows = [{"block": n, **weights.get(n, {}), **acts.get(n, {})} for n in order + sorted(set(weights) - set(order))]
    added = [r["shift_added"] for r in rows if "shift_added" in r]
    return {"blocks": rows, "concentration": concentration(added),
            "total_delta_norm": math.sqrt(sum(r.get("delta_norm", 0.0) ** 2 for r in rows))}


def concentration(values: Sequence[float]) -> float:
    """How concentrated a non-negative profile is: 1 − normalised entropy (0 = spread evenly, 1 = one block)."""
    v = [max(x, 0.0) for x in values]
    total = sum(v)
    if total <= 0 or len(v) < 2:
        return 0.0
    p = [x / total for x in v if x > 0]
    return 1.0 - (-sum(x * math.log(x) for x in p)) / math.log(len(v))


def profile_distance(a: dict, b: dict, key: str) -> float:
    """Total-variation distance between two diagnoses' normalised per-block profiles of ``key`` (0 = same shape)."""
    va = {r["block"]: max(r[key], 0.0) for r in a["blocks"] if key in r}
    vb = {r["block"]: max(r.get(key, 0.0), 0.0) for r in b["blocks"]}
    sa, sb = sum(va.values()) or 1.0, sum(vb.get(n, 0.0) for n in va) or 1.0
    return 0.5 * sum(abs(va[n] / sa - vb.get(n, 0.0) / sb) for n in va)


def plot_profile(result: dict, out: Path, baseline: dict | None = None, label: str = "run",
                 baseline_label: str = "baseline") -> Path:
    """Bars per block: the activation shift each block adds, and ‖ΔW‖_F (a baseline beside it when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["blocks"] if "shift_added" in r]
    names = [r["block"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3), dpi=100)
    for ax, key, title in ((axes[0], "shift_added", "activation shift added"), (axes[1], "delta_norm", "‖ΔW‖_F")):
        width = 0.4 if baseline else 0.8
        xs = range(len(names))
        ax.bar([x - (width / 2 if baseline else 0) for x in xs], [r.get(key, 0.0) for r in rows], width, label=label)
        if baseline:
            other = {r["block"]: r.get(key, 0.0) for r in baseline["blocks"]}
            ax.bar([x + width / 2 for x in xs], [other.get(n, 0.0) for n in names], width, label=baseline_label)
            ax.legend(fontsize=7)
        ax.set_xticks(list(xs), names, rotation=60, fontsize=7, ha="right")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = out / "diagnose.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def write_diagnosis(result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "diagnose.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.rename(out / "diagnose.json")
    return out / "diagnose.json"


def _run_models(run: Path):
    """(backbone with the base denoiser, base denoiser, tuned denoiser) of a finished ``visalign finetune`` run."""
    import yaml

    from ..config import Component
    from ..errors import UserError
    from ..models.load import build_backbone
    from ..models.lora import load_lora

    cfg_file = run / "config.yaml"
    if not cfg_file.exists():
        raise UserError(f"diagnose: {run} is not a finished run folder (no config.yaml); pass a "
                        "`visalign finetune` train.output_dir")
    model = yaml.safe_load(cfg_file.read_text())["model"]
    kwargs = {k: v for k, v in model.items() if k != "name"}
    bb = build_backbone(Component(model["name"], kwargs))
    base = bb.unwrapped()
    if (run / "lora").exists():
        tuned_bb = build_backbone(Component(model["name"], kwargs))
        load_lora(tuned_bb, run / "lora")
    elif (run / "model").exists():
        tuned_bb = build_backbone(Component(model["name"], kwargs | {"path": str(run / "model")}))
    else:
        raise UserError(f"diagnose: {run} has neither lora/ nor model/ (did the run finish?)")
    return bb, base.eval(), tuned_bb.unwrapped().eval()


def diagnose_run(run: str | Path, prompts: Sequence[str], baseline: str | None = None, out: str | Path | None = None,
                 seed: int = 0) -> dict:
    """Diagnose ``run`` against its base; ``baseline``: another run folder, or 'random' (a random adapter of the
    same total ‖ΔW‖_F). Writes diagnose.json and diagnose.png to ``out`` (default: the run folder)."""
    run = Path(run)
    out = Path(out) if out else run
    bb, base, tuned = _run_models(run)
    result = diagnose_models(bb, base, tuned, prompts)
    other = None
    if baseline == "random":
        other = diagnose_models(bb, base, random_adapter(tuned, seed), prompts)
    elif baseline:
        obb, obase, otuned = _run_models(Path(baseline))
        other = diagnose_models(obb, obase, otuned, prompts)
    if other is not None:
        result["baseline"] = {"name": baseline, **other,
                              "distance_shift_added": profile_distance(result, other, "shift_added"),
                              "distance_delta_norm": profile_distance(result, other, "delta_norm")}
    write_diagnosis(result, out)
    plot_profile(result, out, other, label=run.name, baseline_label=str(baseline))
    return result


def format_diagnosis(result: dict) -> str:
    lines = ["| block | ‖ΔW‖_F | ‖ΔW‖/‖W‖ | top-1 share | contraction | act. shift | shift added |",
             "|---|---|---|---|---|---|---|"]
    for r in result["blocks"]:
        def f(key: str, fmt: str = ".4f", r=r) -> str:
            return format(r[key], fmt) if key in r else "—"
        lines.append(f"| {r['block']} | {f('delta_norm')} | {f('relative_norm', '.2e')} | {f('top1_share', '.3f')} | "
                     f"{f('contraction', '+.2e')} | {f('activation_shift')} | {f('shift_added', '+.4f')} |")
    lines.append(f"\nconcentration of the added shift (0 even, 1 one block): {result['concentration']:.3f}")
    if "baseline" in result:
        b = result["baseline"]
        lines.append(f"baseline {b['name']}: concentration {b['concentration']:.3f}; profile distance (total "
                     f"variation) added shift {b['distance_shift_added']:.3f}, ‖ΔW‖ {b['distance_delta_norm']:.3f}")
    return "\n".join(lines)
