"""The memory planner (issue #37): exact counts from a config on the meta device, an activation model fitted
on small sizes that predicts other sizes, and a plan within 20% of what a real training step holds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from visalign.cli import main
from visalign.models.plan import RunShape, build_denoiser, image_tokens, lora_parameters, plan_parts, published_config
from visalign.models.plan_fit import fit, measure_activations, peak_tensor_bytes, tensor_bytes, with_lora
from visalign.models.plan_inputs import INPUTS

FAMILIES = [("sd", "sd15"), ("sdxl", "sdxl"), ("sd3", "sd3"), ("flux", "flux"), ("sana", "sana"),
            ("pixart", "pixart")]  # UNets and DiTs


def test_fit_recovers_a_known_curve():
    ts = [16, 64, 144, 256]
    gamma, alpha, beta = fit(ts, [3.0 + 2.0 * t + 0.5 * t * t for t in ts])
    assert (gamma, alpha, beta) == pytest.approx((3.0, 2.0, 0.5), rel=1e-6)


@pytest.mark.parametrize("family,variant", FAMILIES)
def test_counts_from_the_config_match_the_built_model(family, variant, tiny_dir):
    config = published_config(family, str(tiny_dir(variant)))
    empty, real = build_denoiser(config), build_denoiser(config, empty=False)
    assert sum(p.numel() for p in empty.parameters()) == sum(p.numel() for p in real.parameters())
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    before = sum(p.numel() for p in real.parameters())
    with_lora(real, 4, targets)
    assert sum(p.numel() for p in real.parameters()) - before == lora_parameters(empty, targets, 4)


def _real_step_bytes(config, resolution, lora_rank, checkpointing, batch):
    """What one training step of the real model holds at its peak: its weights, plus the peak of live tensors
    the step adds (forward, backward and the AdamW step: activations, recomputation, gradients, optimizer
    states), from PyTorch's memory profiler: an independent measure, not the planner's fitted model."""
    model = with_lora(build_denoiser(config, empty=False, dtype=torch.bfloat16).train(), lora_rank,
                      ("to_q", "to_k", "to_v", "to_out.0"))
    if checkpointing:
        model.enable_gradient_checkpointing()
    trainable = [p for p in model.parameters() if p.requires_grad]
    inputs = INPUTS[config["_class_name"]](config, resolution, batch, config["_text_tokens"], torch.bfloat16)
    opt = torch.optim.AdamW(trainable)

    def step():
        out = model(**inputs)
        (out[0] if isinstance(out, tuple) else out.sample).float().pow(2).mean().backward()
        opt.step()

    added = peak_tensor_bytes(step, alive=tensor_bytes(model, inputs))
    return sum(p.numel() * p.element_size() for p in model.parameters()) + added


def test_the_step_peak_sees_allocations_and_frees():
    def allocate():
        a = torch.zeros(1_000_000)  # 4 MB
        b = a + 1  # 8 MB live
        del a, b
        return torch.zeros(500_000)  # 2 MB: the peak stays 8

    assert 8_000_000 <= peak_tensor_bytes(allocate) < 8_001_000  # a scalar or two of bookkeeping


def test_tensors_made_before_the_step_are_not_counted_as_its_own():
    """The profiler enters a weight at its first use; a frozen Linear's step adds only its output and the
    input's gradient, never the weight (the measured-peak fit once counted each
    block's weights as activations: FLUX, 680 MB a double block). The sum's gradient is a broadcast scalar."""
    layer = torch.nn.Linear(512, 2048).requires_grad_(False)  # 4 MiB of weight
    x = torch.randn(4, 512, requires_grad=True)

    def step():
        layer(x).sum().backward()

    expected = 4 * 2048 * 4 + 4 * 512 * 4  # the output, x's gradient
    added = peak_tensor_bytes(step, alive=tensor_bytes(layer, {"x": x}))
    assert expected <= added < expected + 1_000


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("family,variant", [("sd", "sd15"), ("flux", "flux")])
def test_the_plan_lies_within_20_percent_of_a_real_step_at_sizes_it_was_not_fitted_on(family, variant, tiny_dir,
                                                                                      checkpointing):
    config = published_config(family, str(tiny_dir(variant)))
    f = config["_vae_factor"]
    # fitted above 12² latents: below that, CPU kernels switch regime (a step in the measured peaks)
    fitted = measure_activations(config, tuple(s * f for s in (16, 20, 24, 28)), checkpointing=checkpointing)
    for side in (32, 40, 48):  # three sizes beyond the fit's, at a batch it was not fitted on either
        shape = RunShape(family=family, resolution=side * f, batch=4, images_per_sample=1, lora_rank=4,
                         compute="bf16", weights="bf16", cache_complete=True, checkpointing=checkpointing)
        parts = plan_parts(shape, config, fitted, fitted)
        planned = sum(v for k, v in parts.items() if not k.startswith("allocator"))
        measured = _real_step_bytes(config, side * f, 4, checkpointing, batch=4)
        assert abs(planned - measured) / measured < 0.20, (side, planned, measured)
        assert image_tokens(config, side * f) > 0


def test_plan_prints_every_part_and_each_card_size(capsys):
    assert main(["plan", "shapes", "train.batch_size=2"]) == 0
    out = capsys.readouterr().out
    for part in ("weights (denoiser)", "trainable (fp32)", "gradients", "optimizer states", "activations",
                 "rollouts kept", "text encoders + VAE", "total", "24 GB", "48 GB", "80 GB", "estimate"):
        assert part in out


def test_where_bf16_is_emulated_the_fit_runs_in_fp32_and_the_plan_scales_it_to_the_run_dtype(tiny_dir, tmp_path,
                                                                                           monkeypatch):
    """An AVX2-only CPU emulates bf16 (20x slower): the fit's steps run in fp32, are cached under their own key,
    and a bf16 run's plan scales them by one measured bf16/fp32 step ratio, within 20% of a real bf16 step.
    Halving them (the dtypes' bytes) was not: 0.61 of the real step here, as the loss, norms and softmax keep
    fp32 tensors in a bf16 step."""
    import visalign.models.load as load
    from visalign.models.plan_fit import activation_models

    config = published_config("flux", str(tiny_dir("flux")))
    monkeypatch.setattr(load, "bf16_is_emulated", lambda device: True)
    monkeypatch.setattr("visalign.models.plan_fit.MEASURED_SIDES", (16, 20, 24, 28))
    free, ckpt = activation_models(config, "flux", tmp_path)
    assert free.measured_bytes == ckpt.measured_bytes == 4.0
    assert 0.5 < free.half_ratio < 1.0 and 0.5 < ckpt.half_ratio < 1.0
    assert activation_models(config, "flux", tmp_path) == (free, ckpt)  # read back from its cache, ratio included
    (cached,) = tmp_path.glob("*.json")
    assert "-peak-fp32-" in cached.name
    f = config["_vae_factor"]
    shape = RunShape(family="flux", resolution=32 * f, batch=4, images_per_sample=1, lora_rank=4, compute="bf16",
                     weights="bf16", cache_complete=True)
    as_fp32 = plan_parts(dataclasses.replace(shape, compute="fp32"), config, free, ckpt)["activations"]
    parts = plan_parts(shape, config, free, ckpt)
    assert parts["activations"] == pytest.approx(as_fp32 * free.half_ratio)
    planned = sum(v for k, v in parts.items() if not k.startswith("allocator"))
    measured = _real_step_bytes(config, 32 * f, 4, False, batch=4)
    assert abs(planned - measured) / measured < 0.20, (planned, measured)
    monkeypatch.setattr(load, "bf16_is_emulated", lambda device: False)  # the bf16 fit is another cache entry
    assert activation_models(config, "flux", tmp_path)[0].measured_bytes == 2.0
    assert len(list(tmp_path.glob("*.json"))) == 2
