"""PixArt-Σ and Sana on tiny real configurations: sampling equals their own pipelines (with the sampler
visalign uses swapped in), noise/target conventions equal their schedulers', and Sana's prompt handling."""

import pytest
import torch
from helpers import run_pipeline, tiny_pipeline

from visalign.models.pixart import PixArtBackbone
from visalign.models.sana import SanaBackbone, default_instruction

PROMPTS = ["a red circle", "two blue squares"]


def test_pixart_sampling_equals_the_pipeline_with_ddim(tiny_dir):
    from diffusers import DDIMScheduler

    pipe = tiny_pipeline(tiny_dir("pixart"))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # visalign samples ε models with DDIM
    bb = PixArtBackbone(str(tiny_dir("pixart")), max_sequence_length=8)
    assert bb.learned_sigma and bb.sample_shape == (4, 16, 16)
    x_T = torch.randn(2, *bb.sample_shape, generator=torch.Generator().manual_seed(0))
    ours = bb.sample(PROMPTS, steps=3, guidance=4.5, latents=x_T).images
    theirs = run_pipeline(pipe, PROMPTS, 32, num_inference_steps=3, guidance_scale=4.5, latents=x_T)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_pixart_noise_is_ddpm_and_the_target_is_the_eps_half(tiny_dir):
    from diffusers import DDPMScheduler

    bb = PixArtBackbone(str(tiny_dir("pixart")), max_sequence_length=8)
    sched = DDPMScheduler.from_pretrained(tiny_dir("pixart"), subfolder="scheduler")
    x0, eps, t = torch.randn(2, *bb.sample_shape), torch.randn(2, *bb.sample_shape), torch.tensor([10, 900])
    n = bb.noise(x0, t=t, eps=eps)
    assert torch.allclose(n.x_t, sched.add_noise(x0, eps, t), atol=1e-6) and torch.equal(n.target, eps)
    cond = bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        full = bb.denoiser(n.x_t, encoder_hidden_states=cond.tensors["hidden"],
                           encoder_attention_mask=cond.tensors["mask"], timestep=t,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        assert full.shape[1] == 8 and torch.equal(bb.predict(n.x_t, t, cond), full[:, :4])


def test_sana_sampling_equals_the_pipeline_with_euler(tiny_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_pipeline(tiny_dir("sana"))
    shift = pipe.scheduler.config.flow_shift
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)  # visalign's flow sampler, same shifted σ
    bb = SanaBackbone(str(tiny_dir("sana")), max_sequence_length=8)
    assert bb.shift == shift == 3.0
    x_T = torch.randn(2, *bb.sample_shape, generator=torch.Generator().manual_seed(0))
    ours = bb.sample(PROMPTS, steps=3, guidance=4.5, latents=x_T).images
    theirs = run_pipeline(pipe, PROMPTS, bb.resolution, num_inference_steps=3, guidance_scale=4.5, latents=x_T)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_sana_prompts_carry_the_instruction_and_keep_the_tail(tiny_dir):
    bb = SanaBackbone(str(tiny_dir("sana")), max_sequence_length=8)
    assert bb.instruction == default_instruction() and bb.instruction.startswith("Given a user prompt")
    pipe = tiny_pipeline(tiny_dir("sana"))
    embeds, mask, neg, neg_mask = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, max_sequence_length=8,
                                                     complex_human_instruction=default_instruction().split("\n"))
    cond, uncond = bb.encode_prompts(PROMPTS), bb.unconditional(2, 4.5)
    assert cond.tensors["hidden"].shape[1] == 8
    assert torch.equal(cond.tensors["hidden"], embeds) and torch.equal(cond.tensors["mask"], mask)
    assert torch.equal(uncond.tensors["hidden"], neg) and torch.equal(uncond.tensors["mask"], neg_mask)
    plain = SanaBackbone(str(tiny_dir("sana")), max_sequence_length=8, instruction=False).encode_prompts(PROMPTS)
    assert not torch.equal(plain.tensors["hidden"], cond.tensors["hidden"])


@pytest.mark.parametrize("variant", ["pixart", "sana"])
def test_dc_ae_and_vae_latents_round_trip_shapes(tiny_dir, variant):
    cls = PixArtBackbone if variant == "pixart" else SanaBackbone
    bb = cls(str(tiny_dir(variant)), max_sequence_length=8)
    images = torch.rand(2, 3, bb.resolution, bb.resolution)
    mean, std = bb.latent_moments(images)
    assert mean.shape == (2, *bb.sample_shape) and (std is None) == (variant == "sana")
    out = bb.decode(mean)
    assert out.shape == images.shape and 0 <= float(out.min()) <= float(out.max()) <= 1


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_qwenimage_sampling_equals_the_pipeline(tiny_dir, guidance):
    """Same packed x_T: the template, dropped tokens, masks, μ-shifted grid, norm-rescaled true CFG on " "
    and the VAE's per-channel normalisation give QwenImagePipeline's images."""
    from visalign.models.flux import pack
    from visalign.models.qwenimage import QwenImageBackbone

    bb = QwenImageBackbone(str(tiny_dir("qwenimage")), resolution=32, max_sequence_length=16)
    pipe = tiny_pipeline(tiny_dir("qwenimage"))
    x_T = torch.randn(2, *bb.sample_shape, generator=torch.Generator().manual_seed(0))
    ours = bb.sample(PROMPTS, steps=3, guidance=guidance, latents=x_T).images
    cfg = dict(negative_prompt=" ", true_cfg_scale=guidance) if guidance > 1 else dict(true_cfg_scale=1.0)
    theirs = pipe(PROMPTS, height=32, width=32, num_inference_steps=3, latents=pack(x_T), max_sequence_length=16,
                  output_type="pt", **cfg).images
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_qwenimage_template_and_latent_normalisation(tiny_dir):
    from visalign.models.qwenimage import TEMPLATE, TEMPLATE_TOKENS, QwenImageBackbone

    bb = QwenImageBackbone(str(tiny_dir("qwenimage")), resolution=32, max_sequence_length=16)
    assert len(bb.tokenizer(TEMPLATE.split("{}")[0]).input_ids) == TEMPLATE_TOKENS == 34
    cond = bb.encode_prompts(["a red circle", "two blue squares in a city at night"])
    assert cond.tensors["hidden"].shape[1] == 16 and cond.tensors["mask"].sum(1).tolist()[0] < 16
    images = torch.rand(2, 3, 32, 32)
    mean, std = bb.latent_moments(images)
    raw = bb.vae.encode((images * 2 - 1)[:, :, None]).latent_dist.mean[:, :, 0]
    by_hand = (raw - torch.tensor([0.1, -0.2, 0.05, 0.0]).view(1, 4, 1, 1)) / torch.tensor([1.5, 0.8, 1.2, 1.0]).view(
        1, 4, 1, 1)
    assert torch.allclose(mean, by_hand, atol=1e-6) and std.shape == mean.shape


@pytest.mark.parametrize("variant", ["sana", "qwenimage"])
def test_flow_noise_equals_the_schedulers_scale_noise(tiny_dir, variant):
    """x_t = (1−σ)x0 + σε at the grid's timesteps equals FlowMatchEuler's scale_noise at the family's shift
    (Sana: its DPM-Solver's flow_shift; Qwen-Image: μ of its resolution), and the target is ε − x0."""
    from visalign.models.qwenimage import QwenImageBackbone

    cls = SanaBackbone if variant == "sana" else QwenImageBackbone
    bb = cls(str(tiny_dir(variant)), **cls.tiny_kwargs)
    sched = bb.sampling_scheduler(10)
    x0, eps = torch.randn(3, *bb.sample_shape), torch.randn(3, *bb.sample_shape)
    ts = sched.timesteps[[0, 4, 9]]
    n = bb.noise(x0, t=ts, eps=eps)
    expect = torch.cat([sched.scale_noise(x0[i:i + 1], ts[i:i + 1], eps[i:i + 1]) for i in range(3)])
    assert torch.allclose(n.x_t, expect, atol=1e-5) and torch.equal(n.target, eps - x0)
