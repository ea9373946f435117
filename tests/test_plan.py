"""The memory planner (issue #37): exact counts from a config on the meta device, an activation model fitted
on small sizes that predicts other sizes, and a plan within 20% of what a real training step holds."""

from __future__ import annotations

import pytest
import torch

from visalign.cli import main
from visalign.models.plan import (
    RunShape,
    build_denoiser,
    fit,
    image_tokens,
    lora_parameters,
    measure_activations,
    plan_parts,
    published_config,
    saved_bytes,
)
from visalign.models.plan_inputs import INPUTS

FAMILIES = [("sd", "sd15"), ("sdxl", "sdxl"), ("sd3", "sd3"), ("flux", "flux")]  # UNets and DiTs


def test_fit_recovers_a_known_curve():
    ts = [16, 64, 144, 256]
    gamma, alpha, beta = fit(ts, [3.0 + 2.0 * t + 0.5 * t * t for t in ts])
    assert (gamma, alpha, beta) == pytest.approx((3.0, 2.0, 0.5), rel=1e-6)


@pytest.mark.parametrize("family,variant", FAMILIES)
def test_counts_from_the_config_match_the_built_model(family, variant, tiny_dir):
    from peft import LoraConfig

    config = published_config(family, str(tiny_dir(variant)))
    empty, real = build_denoiser(config), build_denoiser(config, empty=False)
    assert sum(p.numel() for p in empty.parameters()) == sum(p.numel() for p in real.parameters())
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    before = sum(p.numel() for p in real.parameters())
    real.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets)))
    assert sum(p.numel() for p in real.parameters()) - before == lora_parameters(empty, targets, 4)


def _real_step_bytes(config, family, resolution, lora_rank):
    """What one training step of the real model holds at its peak: weights, adapter, gradients and AdamW
    states (counted from the tensors after a step) plus what autograd saved in the forward."""
    from peft import LoraConfig

    model = build_denoiser(config, empty=False, dtype=torch.bfloat16).train()
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    inputs = INPUTS[config["_class_name"]](config, resolution, 2, config["_text_tokens"], torch.bfloat16)
    saved = saved_bytes(model, inputs)
    out = model(**inputs)
    (out[0] if isinstance(out, tuple) else out.sample).float().pow(2).mean().backward()
    opt = torch.optim.AdamW(trainable)
    opt.step()
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    held += sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    held += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if v.dim())
    return held + saved


@pytest.mark.parametrize("family,variant", [("sd", "sd15"), ("flux", "flux")])
def test_the_plan_lies_within_20_percent_of_a_real_step_at_sizes_it_was_not_fitted_on(family, variant, tiny_dir):
    config = published_config(family, str(tiny_dir(variant)))
    f = config["_vae_factor"]
    free = measure_activations(config, tuple(s * f for s in (4, 8, 12, 16)))
    for side in (20, 24, 32):  # three sizes beyond the fit's
        shape = RunShape(family=family, resolution=side * f, batch=2, images_per_sample=1, lora_rank=4,
                         compute="bf16", weights="bf16", cache_complete=True)
        parts = plan_parts(shape, config, free, free)
        planned = sum(v for k, v in parts.items() if not k.startswith("allocator"))
        measured = _real_step_bytes(config, family, side * f, 4)
        assert abs(planned - measured) / measured < 0.20, (side, planned, measured)
        assert image_tokens(config, side * f) > 0


def test_plan_prints_every_part_and_each_card_size(capsys):
    assert main(["plan", "shapes", "train.batch_size=2"]) == 0
    out = capsys.readouterr().out
    for part in ("weights (denoiser)", "trainable (fp32)", "gradients", "optimizer states", "activations",
                 "rollouts kept", "text encoders + VAE", "total", "24 GB", "48 GB", "80 GB", "estimate"):
        assert part in out
