"""Backbones: conventions equal diffusers' own, errors, LoRA reference, inversion, log-probs, SDXL ids, reloads."""

import math

import pytest
import torch

from visalign.models.backbone import Cond, SampleOutput, per_image_mse
from visalign.models.flow import FlowBackbone
from visalign.models.lora import LoraSpec, add_lora, save_lora
from visalign.models.pixel import PixelBackbone
from visalign.models.unet import SDBackbone, SDXLBackbone

PROMPTS = ["a photo of a red circle", "a cat riding a horse"]


@pytest.fixture(scope="module")
def sd(tiny_dir):
    return SDBackbone(str(tiny_dir("sd15")))


@pytest.fixture(scope="module")
def sd_v(tiny_dir):
    return SDBackbone(str(tiny_dir("sd15", prediction_type="v_prediction")))


@pytest.fixture(scope="module")
def sd3(tiny_dir):
    return FlowBackbone(str(tiny_dir("sd3")), max_sequence_length=8)


def _alphas_by_hand(cfg) -> torch.Tensor:
    """ᾱ_t from the scheduler config, computed independently of diffusers (scaled_linear schedule)."""
    assert cfg["beta_schedule"] == "scaled_linear"
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, cfg["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_eps_noise_equals_scheduler_add_noise_and_closed_form(sd):
    x0 = torch.randn(3, *sd.sample_shape)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 400, 999])
    n = sd.noise(x0, t=t, eps=eps)
    assert torch.allclose(n.x_t, sd.train_scheduler.add_noise(x0, eps, t), atol=1e-6)
    a = _alphas_by_hand(sd.scheduler_config)[t].float().view(-1, 1, 1, 1)
    assert torch.allclose(n.x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-5)
    assert torch.equal(n.target, eps)


def test_v_target_equals_get_velocity_and_closed_form(sd_v):
    x0 = torch.randn(2, *sd_v.sample_shape)
    eps = torch.randn_like(x0)
    t = torch.tensor([10, 700])
    n = sd_v.noise(x0, t=t, eps=eps)
    assert sd_v.prediction_type == "v_prediction"
    assert torch.allclose(n.target, sd_v.train_scheduler.get_velocity(x0, eps, t), atol=1e-6)
    a = _alphas_by_hand(sd_v.scheduler_config)[t].float().view(-1, 1, 1, 1)
    assert torch.allclose(n.target, a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-5)


def test_flow_noise_and_target_equal_flowmatch_definitions(sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(sd3.scheduler_config)
    sched.set_timesteps(10)
    x0 = torch.randn(3, *sd3.sample_shape)
    eps = torch.randn_like(x0)
    ts = sched.timesteps[[0, 4, 9]]
    n = sd3.noise(x0, t=ts, eps=eps)
    ref = torch.cat([sched.scale_noise(x0[i:i + 1], ts[i:i + 1], eps[i:i + 1]) for i in range(3)])
    assert torch.allclose(n.x_t, ref, atol=1e-5)
    assert torch.equal(n.target, eps - x0)
    # the density: shifted logit-normal σ in (0, 1), t = 1000 σ
    t = sd3.sample_timesteps(4000, torch.Generator().manual_seed(0))
    assert 0 < float(t.min()) and float(t.max()) < 1000
    u = torch.sigmoid(torch.randn(200000, generator=torch.Generator().manual_seed(1)))
    shifted = 3.0 * u / (1 + 2.0 * u)
    assert abs(float((t / 1000).median()) - float(shifted.median())) < 0.02


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "pixel"])
def test_error_equals_independent_mse(tiny_dir, family):
    cls = {"sd15": SDBackbone, "sdxl": SDXLBackbone, "sd3": FlowBackbone, "pixel": PixelBackbone}[family]
    kw = {"max_sequence_length": 8} if family == "sd3" else {}
    bb = cls(str(tiny_dir(family)), **kw)
    x0 = torch.randn(2, *bb.sample_shape)
    cond = bb.encode_prompts(PROMPTS)
    n = bb.noise(x0, generator=torch.Generator().manual_seed(0))
    err = bb.error(n, cond)
    pred = bb.predict(n.x_t, n.t, cond)
    manual = torch.stack([((pred[i] - n.target[i]) ** 2).mean() for i in range(2)])
    assert err.shape == (2,)
    assert torch.allclose(err, manual, rtol=1e-5)


def _storage_ids(module: torch.nn.Module) -> set:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def test_lora_reference_is_base_exactly_and_needs_no_copy(tiny_dir):
    bb = SDBackbone(str(tiny_dir("sd15")))
    base = SDBackbone(str(tiny_dir("sd15")))
    n_before = sum(p.numel() for p in bb.unwrapped().parameters())
    add_lora(bb, LoraSpec(rank=4, alpha=8, init="gaussian"))
    lora_params = [p for p in bb.unwrapped().parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in lora_params)
    # base weights exist once: total = base + adapters, and no reference copy is held
    assert sum(p.numel() for p in bb.unwrapped().parameters()) == n_before + n_lora
    assert bb._reference_denoiser is None
    all_storages = set().union(*(_storage_ids(m) for m in bb.modules().values()))
    assert len(all_storages) == len(list(bb.unwrapped().parameters())) + sum(
        len(list(m.parameters())) for k, m in bb.modules().items() if k != "denoiser")
    x = torch.randn(2, *bb.sample_shape)
    t = torch.tensor([100, 600])
    cond = bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        expected = base.predict(x, t, cond)
        with bb.reference():
            inside = bb.predict(x, t, cond)
    assert torch.equal(inside, expected)
    opt = torch.optim.SGD(lora_params, lr=1.0)
    bb.predict(x, t, cond).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        after = bb.predict(x, t, cond)
        with bb.reference():
            ref_after = bb.predict(x, t, cond)
    assert not torch.allclose(after, expected, atol=1e-4)
    assert torch.equal(ref_after, expected)


def test_full_finetune_reference_is_a_frozen_copy(tiny_dir):
    bb = PixelBackbone(str(tiny_dir("pixel")))
    bb.freeze_reference_copy()
    bb.unwrapped().requires_grad_(True)
    x, t = torch.randn(1, *bb.sample_shape), torch.tensor([500])
    cond = bb.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        before = bb.predict(x, t, cond)
    bb.predict(x, t, cond).pow(2).mean().backward()
    torch.optim.SGD(bb.unwrapped().parameters(), lr=0.1).step()
    with torch.no_grad():
        policy = bb.predict(x, t, cond)
        with bb.reference():
            ref = bb.predict(x, t, cond)
    assert torch.allclose(ref, before, atol=1e-6)
    assert not torch.allclose(policy, before, atol=1e-4)
    assert not any(p.requires_grad for p in bb._reference_denoiser.parameters())


def test_ddim_inversion_round_trip(sd):
    """Invert x0 up a 50-step grid to t ≈ 300, then DDIM back with diffusers' own scheduler.

    Tolerance: DDIM inversion assumes ε(x_t) ≈ ε(x_{t−Δ}); its error grows with the model's
    roughness and with 1/√ᾱ_t. A random-init UNet is rough, so we invert over the low-noise part
    of the grid (1/√ᾱ ≤ 1.4) and ask the reconstruction error to be below 5% of ‖x0‖² and at least
    10x smaller than the distance of x_t itself from x0 (what a do-nothing inverse would leave).
    """
    x0 = torch.randn(2, *sd.sample_shape, generator=torch.Generator().manual_seed(3))
    cond = sd.encode_prompts(PROMPTS)
    with torch.no_grad():
        x_t, t = sd.invert(x0, cond, steps=50, until=300)
        sched = sd.sampling_scheduler(50)
        x = x_t
        for tt in sched.timesteps[sched.timesteps <= t[0]]:
            x = sched.step(sd.predict(x, tt.expand(2), cond), tt, x).prev_sample
    rel = float((x - x0).pow(2).mean() / x0.pow(2).mean())
    rel_xt = float((x_t - x0).pow(2).mean() / x0.pow(2).mean())
    assert int(t[0]) == 281
    assert rel < 0.05 and rel < rel_xt / 10


def test_step_logprob_equals_independent_gaussian(sd):
    steps, eta = 10, 1.0
    sched = sd.sampling_scheduler(steps)
    t = sched.timesteps[3]
    t_prev = int(t) - 1000 // steps
    x_t = torch.randn(2, *sd.sample_shape)
    cond = sd.encode_prompts(PROMPTS)
    with torch.no_grad():
        pred = sd.predict(x_t, t.expand(2), cond)
        z = torch.randn_like(x_t)
        x_prev = sched.step(pred, t, x_t, eta=eta, variance_noise=z).prev_sample
        lp = sd.step_logprob(x_t, x_prev, t, cond, steps=steps, eta=eta)
    a = _alphas_by_hand(sd.scheduler_config)
    a_t, a_p = float(a[int(t)]), float(a[t_prev])
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    std = eta * math.sqrt(var)
    x0_hat = (x_t.double() - math.sqrt(1 - a_t) * pred.double()) / math.sqrt(a_t)
    mean = math.sqrt(a_p) * x0_hat + math.sqrt(1 - a_p - std**2) * pred.double()
    ref = (-(x_prev.double() - mean) ** 2 / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi))
    ref = ref.flatten(1).mean(1)
    assert torch.allclose(lp.double(), ref, atol=1e-3)
    # and the scheduler's own sample is exactly mean + std * z
    assert torch.allclose(x_prev.double(), mean + std * z.double(), atol=1e-4)


def test_sample_trajectory_log_probs_match_step_logprob(sd):
    out = sd.sample(PROMPTS, steps=4, guidance=1.0, eta=1.0, trajectory=True,
                    generator=torch.Generator().manual_seed(0))
    assert len(out.trajectory) == 5 and out.log_probs.shape == (2, 4)
    cond = sd.encode_prompts(PROMPTS)
    with torch.no_grad():
        lp = sd.step_logprob(out.trajectory[1], out.trajectory[2], out.timesteps[1], cond, steps=4, eta=1.0)
    assert torch.allclose(lp, out.log_probs[:, 1], atol=1e-4)


def test_flow_sde_logprob_matches_sampling(sd3):
    out = sd3.sample(PROMPTS, steps=4, guidance=1.0, eta=0.7, trajectory=True,
                     generator=torch.Generator().manual_seed(0))
    cond = sd3.encode_prompts(PROMPTS)
    with torch.no_grad():
        lp = sd3.step_logprob(out.trajectory[2], out.trajectory[3], out.timesteps[2], cond, steps=4, eta=0.7)
    assert torch.allclose(lp, out.log_probs[:, 2], atol=1e-4)


def test_sdxl_time_ids_follow_real_size_and_crop(tiny_dir):
    bb = SDXLBackbone(str(tiny_dir("sdxl")))
    meta = {"original_size": torch.tensor([[480.0, 640.0], [1024.0, 768.0]]),
            "crop_top_left": torch.tensor([[0.0, 80.0], [128.0, 0.0]])}
    cond = bb.encode_prompts(PROMPTS, meta)
    r = float(bb.resolution)
    assert cond.tensors["time_ids"].tolist() == [[480, 640, 0, 80, r, r], [1024, 768, 128, 0, r, r]]
    plain = bb.encode_prompts(PROMPTS)
    assert plain.tensors["time_ids"].tolist() == [[r, r, 0, 0, r, r]] * 2
    # and they reach the UNet: different ids, different prediction
    x, t = torch.randn(2, *bb.sample_shape), torch.tensor([500, 500])
    with torch.no_grad():
        assert not torch.allclose(bb.predict(x, t, cond), bb.predict(x, t, plain))


def test_sdxl_data_pipeline_records_size_and_crop(tmp_path):
    from PIL import Image

    from visalign.data.pairs import prepare_image

    wide = prepare_image(Image.new("RGB", (640, 480)), 32)
    tall = prepare_image(Image.new("RGB", (300, 500)), 32)
    assert wide.original_size == (480, 640) and wide.crop_top_left == (0, (43 - 32) // 2)
    assert tall.original_size == (500, 300) and tall.crop_top_left == ((53 - 32) // 2, 0)


PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sd3": "StableDiffusion3Pipeline"}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_tiny_pipeline_reloads_generates_and_loads_visalign_lora(tiny_dir, tmp_path, family):
    import diffusers

    path = tiny_dir(family)
    kw = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(path, **kw)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    before = pipe("a cat", num_inference_steps=2, output_type="pt", generator=gen()).images
    assert before.shape[-1] == 32 and torch.isfinite(before).all()
    cls = {"sd15": SDBackbone, "sdxl": SDXLBackbone, "sd3": FlowBackbone}[family]
    bb = cls(str(path), **({"max_sequence_length": 8} if family == "sd3" else {}))
    add_lora(bb, LoraSpec(rank=4, alpha=2.0, init="gaussian"))
    with torch.no_grad():  # make the adapter non-trivial
        for name, p in bb.unwrapped().named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    save_lora(bb, tmp_path / "lora")
    pipe.load_lora_weights(tmp_path / "lora")
    after = pipe("a cat", num_inference_steps=2, output_type="pt", generator=gen()).images
    assert (after - before).abs().max() > 1e-3
    # alpha != rank survives the round trip (adapter metadata written)
    cfg = next(iter(pipe.unet.peft_config.values())) if family != "sd3" else next(
        iter(pipe.transformer.peft_config.values()))
    assert cfg.lora_alpha == 2.0 and cfg.r == 4


def test_pixel_folder_reloads_with_plain_classes_and_samples(tiny_dir):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    path = tiny_dir("pixel")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    AutoTokenizer.from_pretrained(path / "tokenizer")
    DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    bb = PixelBackbone(str(path))
    out = bb.sample(PROMPTS[:1], steps=2, guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, unet.config.sample_size, unet.config.sample_size)
    assert 0 <= float(out.images.min()) and float(out.images.max()) <= 1


def test_missing_weights_give_one_clear_error(tmp_path):
    from visalign.models.load import ModelLoadError

    with pytest.raises(ModelLoadError, match="no folder at .*model.path="):
        SDBackbone(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="could not load .*hub id while online"):
        SDBackbone("some-org/not-cached-model")


def test_pickle_weights_are_refused(tiny_dir, tmp_path):
    import shutil

    from diffusers import UNet2DConditionModel

    from visalign.models.load import ModelLoadError

    src = tiny_dir("pixel")
    dst = tmp_path / "pickled"
    shutil.copytree(src, dst)
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet")
    (dst / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(dst / "unet", safe_serialization=False)
    assert (dst / "unet" / "diffusion_pytorch_model.bin").exists()
    with pytest.raises(ModelLoadError, match="pickle"):
        PixelBackbone(str(dst))


def test_cond_helpers():
    c = Cond({"hidden": torch.arange(6.0).view(2, 3), "pooled": torch.ones(2, 1)})
    assert len(c) == 2
    assert c.repeat_interleave(2).tensors["hidden"][:, 0].tolist() == [0, 0, 3, 3]
    assert len(Cond.cat([c, c[:1]])) == 3
    assert per_image_mse(torch.ones(2, 3), torch.zeros(2, 3)).tolist() == [1.0, 1.0]


def test_sampling_device_follows_the_environment_and_moves_every_module(tiny_dir, monkeypatch):
    from visalign.registry import ConfigError
    from visalign.train.build import sampling_device

    monkeypatch.setenv("VISALIGN_DEVICE", "gpu0")
    with pytest.raises(ConfigError, match="VISALIGN_DEVICE='gpu0' is not a torch device"):
        sampling_device()
    monkeypatch.setenv("VISALIGN_DEVICE", "meta")
    assert sampling_device() == torch.device("meta")
    monkeypatch.delenv("VISALIGN_DEVICE")
    assert sampling_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bb = SDBackbone(str(tiny_dir("sd15")))  # its own copy: it ends on the meta device
    bb.to_device("meta")  # in training the denoiser stays where accelerate's prepare puts it
    devices = {name: {p.device.type for p in m.parameters()} for name, m in bb.modules().items()}
    assert devices.pop("denoiser") == {"cpu"} and all(d == {"meta"} for d in devices.values())
    bb.to_device("meta", include_denoiser=True)
    assert all(p.device.type == "meta" for m in bb.modules().values() for p in m.parameters())
    # seeded noise made on the CPU (as eval and make-dataset make it) follows the model to its device
    seen, empty = [], torch.zeros(1)
    monkeypatch.setattr(bb, "_sample", lambda *args: seen.append(args[6].device) or SampleOutput(empty, empty))
    bb.sample(["a red circle"], steps=2, latents=torch.randn(1, *bb.sample_shape))
    assert seen == [torch.device("meta")]
    # and so do CPU images given to the VAE (held-out implicit accuracy encodes sampled images)
    mean, std = bb.latent_moments(torch.rand(1, 3, bb.resolution, bb.resolution))
    assert mean.device.type == std.device.type == "meta"
