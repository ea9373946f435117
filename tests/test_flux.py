"""FLUX.1 (dev and schnell) on tiny real configurations: conventions equal FluxPipeline's own, LoRA reloads
in plain diffusers, kohya export, and finetune (Diffusion-DPO and GRPO, LoRA and full) from the CLI."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import Redness, write_pairs  # noqa: F401  (Redness: the test_redness reward)
from safetensors.torch import load_file

from visalign.models.flux import FluxBackbone, image_ids, pack, unpack
from visalign.models.lora import LoraSpec, add_lora, save_lora

VARIANTS = ["flux", "flux-schnell"]


def _backbone(tiny_dir, variant: str) -> FluxBackbone:
    return FluxBackbone(str(tiny_dir(variant)), **FluxBackbone.tiny_kwargs)


def _pipe(tiny_dir, variant: str):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_dir(variant))


def _pipe_images(pipe, x_T: torch.Tensor, steps: int, guidance: float = 3.5) -> torch.Tensor:
    """FluxPipeline from the packed x_T, decoded to [0, 1] (its own grid, shift and guidance handling)."""
    return pipe(["a red circle", "two blue squares"], height=32, width=32, num_inference_steps=steps,
                guidance_scale=guidance, latents=pack(x_T), max_sequence_length=8, output_type="pt").images


def test_pack_and_ids_equal_the_pipeline_helpers():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    packed = pack(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    assert torch.equal(unpack(packed, 6, 8), x)
    assert torch.equal(image_ids(6, 8, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampling_equals_flux_pipeline(tiny_dir, variant):
    """Same x_T, same steps: our sampler (grid, μ shift, guidance input, packing, VAE) gives the pipeline's
    images; schnell has no guidance input, so its guidance value changes nothing."""
    bb, pipe = _backbone(tiny_dir, variant), _pipe(tiny_dir, variant)
    x_T = torch.randn(2, *bb.sample_shape, generator=torch.Generator().manual_seed(0))
    ours = bb.sample(["a red circle", "two blue squares"], steps=4, guidance=3.5, latents=x_T).images
    theirs = _pipe_images(pipe, x_T, 4)
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert torch.allclose(ours, theirs, atol=1e-5)
    other = bb.sample(["a red circle", "two blue squares"], steps=4, guidance=1.0, latents=x_T).images
    assert bb.has_guidance_input == (variant == "flux")
    assert torch.allclose(other, ours, atol=1e-6) == (variant == "flux-schnell")


def test_noise_target_and_training_density_follow_the_scheduler(tiny_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler

    bb = _backbone(tiny_dir, "flux")
    sched = bb.sampling_scheduler(10)
    x0 = torch.randn(3, *bb.sample_shape)
    eps = torch.randn_like(x0)
    ts = sched.timesteps[[0, 4, 9]]
    n = bb.noise(x0, t=ts, eps=eps)
    ref = FlowMatchEulerDiscreteScheduler.from_config(bb.scheduler_config)
    ref.set_timesteps(10, sigmas=torch.linspace(1, 0.1, 10).tolist(), mu=bb.mu)
    expect = torch.cat([ref.scale_noise(x0[i:i + 1], ts[i:i + 1], eps[i:i + 1]) for i in range(3)])
    assert torch.allclose(n.x_t, expect, atol=1e-5) and torch.equal(n.target, eps - x0)
    # μ of calculate_shift at 64 tokens, by hand: 0.5 + (1.15 − 0.5)(64 − 256)/(4096 − 256)
    mu = 0.5 + 0.65 * (64 - 256) / 3840
    assert bb.tokens == 64 and bb.mu == pytest.approx(mu)
    # the sampler's σ grid is linspace(1, 1/N, N) under the exponential time shift e^μ / (e^μ + 1/σ − 1)
    s = torch.linspace(1, 0.1, 10, dtype=torch.float64)
    assert torch.allclose(sched.sigmas[:-1].double(), math.exp(mu) / (math.exp(mu) + 1 / s - 1), atol=1e-6)
    # the training density: logit-normal σ shifted by the same e^μ (median of σ = shifted median of u = 0.5)
    t = bb.sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert float((t / 1000).median()) == pytest.approx(math.exp(mu) / (math.exp(mu) + 1), abs=0.01)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_reloads_in_flux_pipeline_and_changes_the_output(tiny_dir, tmp_path, variant):
    bb, pipe = _backbone(tiny_dir, variant), _pipe(tiny_dir, variant)
    x_T = torch.randn(2, *bb.sample_shape, generator=torch.Generator().manual_seed(1))
    before = _pipe_images(pipe, x_T, 2)
    add_lora(bb, LoraSpec(rank=4, alpha=2.0))
    with torch.no_grad():
        for name, p in bb.unwrapped().named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    ours = bb.sample(["a red circle", "two blue squares"], steps=2, guidance=3.5, latents=x_T).images
    save_lora(bb, tmp_path / "lora")
    pipe.load_lora_weights(tmp_path / "lora")
    after = _pipe_images(pipe, x_T, 2)
    assert (after - before).abs().max() > 1e-3
    assert torch.allclose(after, ours, atol=1e-5)  # the pipeline runs exactly the adapter we trained
    cfg = next(iter(pipe.transformer.peft_config.values()))
    assert cfg.lora_alpha == 2.0 and cfg.r == 4


def _finetune(tiny_dir, tmp_path, variant, extra) -> Path:
    from visalign.cli import main

    out = tmp_path / "run"
    argv = ["finetune", variant, f"model.path={tiny_dir(variant)}",
            "model.resolution=32", "model.max_sequence_length=8", f"train.output_dir={out}", "train.steps=2",
            "train.batch_size=2", "train.lr=1e-3", "train.save_every=0", "train.log_every=1", "train.threads=1",
            "train.tracker=none", "train.mixed_precision=no", "train.gradient_checkpointing=false", *extra]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    return out


def _tensors(folder: Path) -> dict:
    return {f"{f.relative_to(folder)}:{k}": v for f in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(f).items()}


@pytest.mark.parametrize("method", ["diffusion_dpo", "grpo"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_finetune_lora_changes_only_the_adapter_and_reloads(tiny_dir, tmp_path, variant, method):
    pairs = write_pairs(tmp_path / "pairs.parquet", n=4, labels=[1, 0, 1, 0])
    data = [f"data.path={pairs}"] if method == "diffusion_dpo" else [
        "data.path=shapes:train", "objective.name=grpo", "objective.group_size=2", "objective.prompts_per_round=2",
        "objective.round_steps=2", "objective.steps=3", "objective.window=2", "objective.reward=test_redness"]
    before = _tensors(tiny_dir(variant))
    out = _finetune(tiny_dir, tmp_path, variant, data)
    after = _tensors(tiny_dir(variant))
    assert all(torch.equal(before[k], after[k]) for k in before)
    pipe = _pipe(tiny_dir, variant)
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    plain = _pipe_images(pipe, x_T, 2)
    pipe.load_lora_weights(out / "lora")
    tuned = _pipe_images(pipe, x_T, 2)
    assert torch.isfinite(tuned).all() and (tuned - plain).abs().max() > 0


@pytest.mark.parametrize("method", ["diffusion_dpo", "grpo"])
def test_finetune_full_changes_only_the_transformer_and_reloads(tiny_dir, tmp_path, method):
    import diffusers

    pairs = write_pairs(tmp_path / "pairs.parquet", n=4, labels=[1, 0, 1, 0])
    data = [f"data.path={pairs}"] if method == "diffusion_dpo" else [
        "data.path=shapes:train", "objective.name=grpo", "objective.group_size=2", "objective.prompts_per_round=2",
        "objective.round_steps=2", "objective.steps=3", "objective.window=2", "objective.reward=test_redness"]
    out = _finetune(tiny_dir, tmp_path, "flux", [*data, "lora.enabled=false", "train.lr=1e-4"])
    model = out / "model"
    base, tuned = _tensors(tiny_dir("flux")), _tensors(model)
    assert base.keys() == tuned.keys()
    assert {k.split("/")[0] for k in base if not torch.equal(base[k], tuned[k])} == {"transformer"}
    pipe = diffusers.FluxPipeline.from_pretrained(model)
    assert torch.isfinite(_pipe_images(pipe, torch.randn(2, 4, 16, 16), 2)).all()


def test_grpo_ratio_is_one_on_policy_with_the_guidance_input(tiny_dir):
    from visalign.config import Component
    from visalign.train.build import build_method

    bb = _backbone(tiny_dir, "flux")
    add_lora(bb, LoraSpec(init="gaussian"))
    m = build_method(Component("grpo", {"group_size": 2, "prompts_per_round": 2, "steps": 3, "window": 2,
                                        "reward": "test_redness"}), guidance=3.5)
    items = m.make_round(bb, ["a photo of a red circle", "a photo of two squares"], torch.Generator().manual_seed(0))
    batch = m.take(items, torch.arange(m.round_size(items)))
    steps = m.trained_steps(batch.extras["logp"])
    with torch.no_grad():
        logp = m.window_logprobs(bb, batch, steps)
    assert torch.equal(torch.exp(logp - batch.extras["logp"][:, steps]), torch.ones_like(logp))


def test_detect_backbone_and_presets_find_flux(tiny_dir):
    from visalign.config import load_config
    from visalign.models.load import detect_backbone

    assert detect_backbone(str(tiny_dir("flux"))) == "flux"
    dev = load_config("flux", [], [])
    assert dev.model.name == "flux" and dev.train.guidance == 3.5
    assert load_config("flux-schnell", [], []).train.sample_steps == 4


def _trained_lora(tiny_dir, targets) -> FluxBackbone:
    bb = _backbone(tiny_dir, "flux")
    add_lora(bb, LoraSpec(rank=2, alpha=3.0, targets=targets))
    with torch.no_grad():
        for name, p in bb.unwrapped().named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return bb


def test_kohya_export_fuses_qkv_block_diagonally(tiny_dir, tmp_path):
    """Every Kohya module's update up·down·alpha/rank equals, row block by row block, the trained adapters'
    B·A·alpha/r of the diffusers modules it fuses (zeros for an untrained part), computed independently."""
    from visalign.cli import main

    bb = _trained_lora(tiny_dir, ("to_q", "to_k", "to_v", "to_out.0", "proj_out"))
    save_lora(bb, tmp_path / "lora")
    assert main(["export-lora", str(tmp_path / "lora"), "--out", str(tmp_path / "k.safetensors")]) == 0
    kohya = load_file(tmp_path / "k.safetensors")
    mods = dict(bb.unwrapped().named_modules())

    def delta(name: str) -> torch.Tensor:
        m = mods[name]
        return m.lora_B["default"].weight @ m.lora_A["default"].weight * (3.0 / 2)

    def kohya_delta(stem: str) -> torch.Tensor:
        down, up = kohya[f"lora_unet_{stem}.lora_down.weight"], kohya[f"lora_unet_{stem}.lora_up.weight"]
        return up @ down * float(kohya[f"lora_unet_{stem}.alpha"]) / down.shape[0]

    qkv = kohya_delta("double_blocks_0_img_attn_qkv")
    assert torch.allclose(qkv, torch.cat([delta(f"transformer_blocks.0.attn.to_{x}") for x in "qkv"]), atol=1e-6)
    assert torch.allclose(kohya_delta("double_blocks_0_img_attn_proj"), delta("transformer_blocks.0.attn.to_out.0"))
    lin1 = kohya_delta("single_blocks_0_linear1")
    width = 16
    assert lin1.shape == (3 * width + 4 * width, width)
    expect = torch.cat([*(delta(f"single_transformer_blocks.0.attn.to_{x}") for x in "qkv"),
                        torch.zeros(4 * width, width)])
    assert torch.allclose(lin1, expect, atol=1e-6)
    assert torch.allclose(kohya_delta("single_blocks_0_linear2"), delta("single_transformer_blocks.0.proj_out"))
    assert not any("transformer_blocks" in k for k in kohya)


def test_kohya_export_reloads_in_diffusers_with_identical_outputs(tiny_dir, tmp_path):
    """Diffusers' own FLUX Kohya loader reads the export (double blocks: its single-block reader assumes the
    full 3072 width) and the pipeline then gives the images of the adapter we trained."""
    from visalign.models.export import export_kohya

    targets = tuple(f"transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0"))
    bb = _trained_lora(tiny_dir, targets)
    x_T = torch.randn(2, *bb.sample_shape, generator=torch.Generator().manual_seed(3))
    ours = bb.sample(["a red circle", "two blue squares"], steps=2, guidance=3.5, latents=x_T).images
    save_lora(bb, tmp_path / "lora")
    export_kohya(tmp_path / "lora", tmp_path / "k.safetensors", family="flux")
    pipe = _pipe(tiny_dir, "flux")
    plain = _pipe_images(pipe, x_T, 2)
    pipe.load_lora_weights(str(tmp_path), weight_name="k.safetensors")
    got = _pipe_images(pipe, x_T, 2)
    assert (ours - plain).abs().max() > 1e-3 and torch.allclose(got, ours, atol=1e-5)


def test_kohya_export_with_a_text_encoder_lora_reloads_in_diffusers(tiny_dir, tmp_path):
    """A FLUX LoRA with a CLIP part: the transformer's in sd-scripts' names, the encoder's as lora_te1_*,
    and diffusers' FLUX loader reads both (identical images to the adapters we trained)."""
    from visalign.models.export import export_kohya
    from visalign.models.lora import add_text_encoder_lora

    targets = tuple(f"transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0"))
    bb = _trained_lora(tiny_dir, targets)
    add_text_encoder_lora(bb, LoraSpec(rank=2, alpha=2.0, targets=("q_proj", "k_proj", "v_proj", "out_proj")))
    with torch.no_grad():
        for n, p in bb.text_encoder.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    x_T = torch.randn(2, *bb.sample_shape, generator=torch.Generator().manual_seed(4))
    ours = bb.sample(["a red circle", "two blue squares"], steps=2, guidance=3.5, latents=x_T).images
    save_lora(bb, tmp_path / "lora")
    export_kohya(tmp_path / "lora", tmp_path / "k.safetensors", family="flux")
    keys = load_file(tmp_path / "k.safetensors")
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_unet_double") for k in keys)
    pipe = _pipe(tiny_dir, "flux")
    pipe.load_lora_weights(str(tmp_path), weight_name="k.safetensors")
    assert torch.allclose(_pipe_images(pipe, x_T, 2), ours, atol=1e-5)


@pytest.mark.parametrize("method", ["inpo", "smpo", "d3po"])
def test_inversion_and_trajectory_methods_run_on_flux(tiny_dir, tmp_path, method):
    """The flow inversion (InPO, SmPO) and the SDE log-densities (D3PO) work through FLUX's packing and
    guidance input."""
    pairs = write_pairs(tmp_path / "pairs.parquet", n=4, labels=[1, 0, 1, 0], scores=True)
    data = {"inpo": [f"data.path={pairs}", "objective.name=inpo", "objective.steps=2"],
            "smpo": [f"data.path={pairs}", "objective.name=smpo", "objective.steps=2"],
            "d3po": ["data.path=shapes:train", "objective.name=d3po", "objective.steps=3",
                     "objective.prompts_per_round=2", "objective.reward=test_redness", "objective.min_margin=0"]}
    _finetune(tiny_dir, tmp_path, "flux", data[method])
