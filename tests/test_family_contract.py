"""The contract every registered model family meets, checked on its tiny folder: a family file that registers
a backbone (with ``tiny_variants``) is covered here without editing this file."""

import pytest
import torch
from helpers import family_of, family_variants, load_lora_into, preset_for, run_pipeline, tiny_pipeline

from visalign.models.backbone import Backbone, per_image_mse
from visalign.models.lora import LoraSpec, add_lora, load_lora, save_lora

VARIANTS = family_variants()
PROMPTS = ["a photo of a red circle", "a cat riding a horse"]


def _build(tiny_dir, variant):
    from visalign.registry import BACKBONES

    name, cls = family_of(variant)
    return BACKBONES.build(name, path=str(tiny_dir(variant)), **cls.tiny_kwargs)


def test_every_family_declares_what_generic_code_asks_for():
    import diffusers

    from visalign.registry import BACKBONES, PRESETS

    assert {"flux", "sd", "sdxl", "sd3", "pixel", "pixart", "sana", "qwenimage"} <= set(BACKBONES.names())
    for variant in family_variants(all_variants=True):
        name, cls = family_of(variant)
        assert cls.family == name and cls.default_guidance > 0 and cls.pipeline_class
        assert hasattr(getattr(diffusers, cls.lora_pipeline), "save_lora_weights") and cls.lora_prefix
        assert PRESETS.get(preset_for(name))()["model"]["name"] == name


@pytest.mark.parametrize("variant", VARIANTS)
def test_backbone_protocol_detection_and_error(tiny_dir, variant):
    from visalign.models.load import detect_backbone

    bb = _build(tiny_dir, variant)
    assert isinstance(bb, Backbone)
    assert detect_backbone(str(tiny_dir(variant))) == family_of(variant)[0]
    x0 = torch.randn(2, *bb.sample_shape)
    cond = bb.encode_prompts(PROMPTS)
    n = bb.noise(x0, generator=torch.Generator().manual_seed(0))
    assert n.x_t.shape == x0.shape == n.target.shape
    with torch.no_grad():
        err, pred = bb.error(n, cond), bb.predict(n.x_t, n.t, cond)
    manual = torch.stack([((pred[i] - n.target[i]) ** 2).mean() for i in range(2)])
    assert torch.allclose(err, manual, rtol=1e-5) and torch.allclose(err, per_image_mse(pred, n.target))
    assert (bb.unconditional(2, 3.0) is None) == (not bb.true_cfg)
    assert bb.unconditional(2, 1.0) is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampler_log_densities_are_recomputed_exactly(tiny_dir, variant):
    """A stochastic trajectory's per-step log-densities equal step_logprob's recomputation (ratio 1)."""
    bb = _build(tiny_dir, variant)
    out = bb.sample(PROMPTS, steps=3, guidance=2.0, eta=1.0, trajectory=True,
                    generator=torch.Generator().manual_seed(0))
    res = out.images.shape[-1]
    assert out.images.shape == (2, 3, res, res) and 0 <= float(out.images.min()) <= float(out.images.max()) <= 1
    cond = bb.encode_prompts(PROMPTS)
    uncond = bb.unconditional(2, 2.0)
    for s in range(out.log_probs.shape[1]):
        if not torch.isfinite(out.log_probs[:, s]).all():
            continue
        with torch.no_grad():
            lp = bb.step_logprob(out.trajectory[s], out.trajectory[s + 1], out.timesteps[s], cond, steps=3, eta=1.0,
                                 uncond=uncond, guidance=2.0)
        assert torch.allclose(lp, out.log_probs[:, s], atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_reference_reload_and_pipeline(tiny_dir, tmp_path, variant):
    import diffusers

    bb, base = _build(tiny_dir, variant), _build(tiny_dir, variant)
    add_lora(bb, LoraSpec(rank=4, alpha=2.0))
    with torch.no_grad():
        for name, p in bb.unwrapped().named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    x, t = torch.randn(2, *bb.sample_shape), torch.tensor([300.0, 700.0])
    cond = bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        tuned, plain = bb.predict(x, t, cond), base.predict(x, t, cond)
        with bb.reference():
            ref = bb.predict(x, t, cond)
    assert torch.equal(ref, plain) and (tuned - plain).abs().max() > 1e-4
    save_lora(bb, tmp_path / "lora")
    load_lora(base, tmp_path / "lora")
    with torch.no_grad():
        assert torch.allclose(base.predict(x, t, cond), tuned, atol=1e-5)
    if getattr(diffusers, bb.pipeline_class, None) is None:
        return  # a folder of plain parts (pixel): no pipeline to reload with
    pipe = tiny_pipeline(tiny_dir(variant))
    kw = dict(num_inference_steps=2)
    before = run_pipeline(pipe, "a cat", bb.resolution, generator=torch.Generator().manual_seed(0), **kw)
    load_lora_into(pipe, tmp_path / "lora", bb.lora_prefix)
    after = run_pipeline(pipe, "a cat", bb.resolution, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_save_reloads_identically(tiny_dir, tmp_path, variant):
    from visalign.registry import BACKBONES

    bb = _build(tiny_dir, variant)
    with torch.no_grad():
        for p in bb.unwrapped().parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = bb.save_full(tmp_path / "model")
    name, cls = family_of(variant)
    again = BACKBONES.build(name, path=out, **cls.tiny_kwargs)
    x, t = torch.randn(1, *bb.sample_shape), torch.tensor([500.0])
    cond = bb.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        assert torch.equal(again.predict(x, t, cond), bb.predict(x, t, cond))
