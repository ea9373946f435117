"""Continuing ShapesWorld pretraining from a saved model: exact weight hand-over, no repeated batches."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visalign.worlds.shapes.base import PretrainConfig, pretrain, render_batch

TINY = dict(steps=2, batch_size=2, block_out_channels=(16, 32), text_hidden=32, text_layers=1, warmup_steps=1,
            bf16=False, save_every=100)


def _unet(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next((folder / "unet").glob("*.safetensors")))


def test_init_from_hands_over_the_weights_exactly(tmp_path):
    first = pretrain(PretrainConfig(**TINY, save_raw=True), tmp_path / "a", log_every=1)
    raw = first.with_name("a-raw")
    assert not all(torch.equal(_unet(first)[k], v) for k, v in _unet(raw).items())  # EMA differs from raw
    # lr 0: the continued run must leave the loaded raw weights untouched, so any loading slip shows
    second = pretrain(PretrainConfig(**TINY | {"steps": 1}, lr=0.0, init_from=str(raw), step_offset=2,
                                     save_raw=True), tmp_path / "b", log_every=1)
    loaded = _unet(second.with_name("b-raw"))
    assert loaded.keys() == _unet(raw).keys()
    assert all(torch.equal(loaded[k], v) for k, v in _unet(raw).items())
    recipe = json.loads((second / "visalign_pretrain.json").read_text())
    assert recipe["continued_from"] == json.loads((raw / "visalign_pretrain.json").read_text())


def test_step_offset_continues_the_data_stream():
    cfg = PretrainConfig(**TINY)
    x2, p2 = render_batch(2, cfg)
    x0, p0 = render_batch(0, cfg)
    assert not torch.equal(x0, x2) or p0 != p2
    again, _ = render_batch(2, cfg)
    assert torch.equal(again, x2)


def test_init_from_a_different_architecture_is_one_clear_error(tmp_path):
    first = pretrain(PretrainConfig(**TINY | {"steps": 1}), tmp_path / "a", log_every=1)
    with pytest.raises(ValueError, match="init_from.*does not match"):
        pretrain(PretrainConfig(**TINY | {"steps": 1, "block_out_channels": (32, 32)}, init_from=str(first)),
                 tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="init_from"):
        pretrain(PretrainConfig(**TINY, init_from=str(tmp_path / "missing")), tmp_path / "c")


def test_caption_noise_draws_near_misses_of_the_caption():
    from visalign.worlds.shapes.detector import detect, evaluate_objects, record_for_prompt

    def share_correct(noise: float) -> float:
        x, prompts = render_batch(5, PretrainConfig(batch_size=48, caption_noise=noise))
        images = ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        return sum(evaluate_objects(detect(im).objects, record_for_prompt(p))[0]
                   for im, p in zip(images, prompts)) / len(prompts)

    assert share_correct(0.0) == 1.0
    assert share_correct(1.0) == 0.0
    assert 0.2 < share_correct(0.5) < 0.8


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_the_saved_base_samples_with_what_it_was_trained_to_predict(tmp_path, prediction_type):
    from visalign.eval.commands import load_backbone_cli
    from visalign.models.diffusion import denoising_target
    from visalign.worlds.shapes.base import build_components

    cfg = PretrainConfig(**TINY | {"steps": 1}, prediction_type=prediction_type)
    scheduler = build_components(cfg)[3]
    x0, eps, t = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    by_hand = a.sqrt() * eps - (1 - a).sqrt() * x0 if prediction_type == "v_prediction" else eps
    assert torch.allclose(denoising_target(scheduler, x0, eps, t), by_hand, atol=1e-6)

    bb = load_backbone_cli(str(pretrain(cfg, tmp_path / "m", log_every=1)), "pixel", None)
    assert bb.prediction_type == prediction_type
    assert torch.allclose(bb.noise(x0, t, eps).target, by_hand, atol=1e-6)  # DPO's target is the same
    assert int(bb.sampling_scheduler(20).timesteps[0]) == 999  # trailing: sampling starts from pure noise
    # the folder declares the guidance its recipe samples best at (measured on the shipped bases)
    from visalign.models.load import sampling_guidance

    assert sampling_guidance(bb, None) == (1.5 if prediction_type == "v_prediction" else 3.0)


def test_an_unknown_prediction_type_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="prediction_type must be"):
        pretrain(PretrainConfig(**TINY, prediction_type="sample"), tmp_path / "m")
    with pytest.raises(ValueError, match="timestep_spacing must be"):
        pretrain(PretrainConfig(**TINY, timestep_spacing="last"), tmp_path / "m")
