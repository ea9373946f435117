"""k-Diff's generalised target: ε, v and x as special cases, an exact inverse, the v-space loss, a learned k,
and a pixel model that declares its k sampling exactly like the ε or v model it equals."""

import json
import shutil

import pytest
import torch

from visalign.models.kdiff import LearnedK, k_split, k_target, target_angle, velocity_error

G = torch.Generator().manual_seed(0)
X0, EPS = torch.rand(4, 3, 8, 8, generator=G) * 2 - 1, torch.randn(4, 3, 8, 8, generator=G)
ABAR = torch.tensor([0.999, 0.7, 0.2, 0.004], dtype=torch.float64).float()


def _v(x0, eps, abar):
    a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
    return a * eps - s * x0


def test_epsilon_v_and_x_are_special_cases():
    assert torch.allclose(k_target(X0, EPS, ABAR, 0.0), EPS, atol=1e-6)
    assert torch.allclose(k_target(X0, EPS, ABAR, 1.0), _v(X0, EPS, ABAR), atol=1e-6)  # Salimans & Ho's v
    assert torch.allclose(k_target(X0, EPS, ABAR, 2.0), -X0, atol=1e-6)
    phi, theta = target_angle(ABAR, 0.5)  # halfway from ε to v: half the noise angle
    assert torch.allclose(theta, phi / 2) and torch.allclose(phi, torch.atan2((1 - ABAR).sqrt(), ABAR.sqrt()))


@pytest.mark.parametrize("k", [0.0, 0.3, 1.0, 1.6, 2.0])
def test_the_split_inverts_the_target_given_x_t(k):
    a, s = ABAR.sqrt().view(-1, 1, 1, 1), (1 - ABAR).sqrt().view(-1, 1, 1, 1)
    x_t = a * X0 + s * EPS
    x0_hat, eps_hat = k_split(k_target(X0, EPS, ABAR, k), x_t, ABAR, k)
    # where the target cannot identify x0 (ε at ᾱ→0; x at ᾱ→1) the determinant is small: compare elsewhere
    ok = (target_angle(ABAR, k)[0] - target_angle(ABAR, k)[1]).cos() > 0.1
    assert torch.allclose(x0_hat[ok], X0[ok], atol=1e-3) and torch.allclose(eps_hat[ok], EPS[ok], atol=1e-3)
    # v̂ − v = (ŷ − y) / D: the error measured through the split equals the closed form used in training
    y_hat = k_target(X0, EPS, ABAR, k) + 0.1 * torch.randn(X0.shape, generator=G)
    x0_hat, eps_hat = k_split(y_hat, x_t, ABAR, k)
    by_split = ((a * eps_hat - s * x0_hat - _v(X0, EPS, ABAR)) ** 2).flatten(1).mean(1)
    assert torch.allclose(velocity_error(y_hat, k_target(X0, EPS, ABAR, k), ABAR, k)[ok], by_split[ok], rtol=1e-3)


def test_the_loss_is_v_space_for_every_k():
    a, s = ABAR.sqrt().view(-1, 1, 1, 1), (1 - ABAR).sqrt().view(-1, 1, 1, 1)
    x_t = a * X0 + s * EPS
    y = torch.randn(X0.shape, generator=G)
    assert torch.allclose(velocity_error(y, _v(X0, EPS, ABAR), ABAR, 1.0),
                          ((y - _v(X0, EPS, ABAR)) ** 2).flatten(1).mean(1), atol=1e-6)
    # ε-prediction measured in v-space: v̂ − v = (ε̂ − ε)/√ᾱ (the SNR + 1 weighting), the weight capped at 100
    assert torch.allclose(velocity_error(y, EPS, ABAR, 0.0),
                          ((y - EPS) ** 2).flatten(1).mean(1) / ABAR.clamp_min(0.01), rtol=1e-4)
    x0_hat, eps_hat = k_split(y, x_t, ABAR, 0.0)  # and through the split, where the cap does not bite
    by_split = ((a * eps_hat - s * x0_hat - _v(X0, EPS, ABAR)) ** 2).flatten(1).mean(1)
    assert torch.allclose(velocity_error(y, EPS, ABAR, 0.0)[:3], by_split[:3], rtol=1e-4)


def test_a_learned_k_starts_where_asked_and_moves_with_the_loss():
    k = LearnedK(1.0)
    assert float(k().detach()) == pytest.approx(1.0, abs=1e-6)
    # an output that is exactly ε is perfect at k = 0: the gradient pushes k down
    kk = k()
    velocity_error(EPS[1:3], k_target(X0[1:3], EPS[1:3], ABAR[1:3], kk), ABAR[1:3], kk).mean().backward()
    assert k.logit.grad is not None and float(k.logit.grad) > 0


@pytest.mark.parametrize("k, same_as", [(1.0, "v_prediction"), (0.0, "epsilon")])
def test_a_folder_declaring_k_samples_and_trains_like_the_target_it_equals(tiny_dir, tmp_path, k, same_as):
    """The same weights: as a k folder (k = 1 or 0) and as a v or ε folder give the same images and losses."""
    from visalign.models.pixel import PixelBackbone

    plain, declared = tmp_path / "plain", tmp_path / "declared"
    shutil.copytree(tiny_dir("pixel"), plain)
    sched = json.loads((plain / "scheduler" / "scheduler_config.json").read_text())
    (plain / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched | {"prediction_type": same_as}))
    shutil.copytree(plain, declared)
    (declared / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(sched | {"prediction_type": "v_prediction"}))  # ignored: the declared k decides
    (declared / "visalign_parameterisation.json").write_text(json.dumps({"target": "k", "k": k}))
    a, b = PixelBackbone(str(plain)), PixelBackbone(str(declared))
    assert (a.prediction_type, b.prediction_type, b.kdiff_k) == (same_as, "k", k)
    noise = torch.randn((2, *a.sample_shape), generator=torch.Generator().manual_seed(1))
    prompts = ["a photo of a red circle", "a photo of two squares"]
    with torch.no_grad():
        ia = a.sample(prompts, steps=4, guidance=2.0, latents=noise).images
        ib = b.sample(prompts, steps=4, guidance=2.0, latents=noise).images
        # ε at the first trailing step divides by √ᾱ_999 ≈ 5e-5 on both routes: float32 rounding shows there
        assert torch.allclose(ia, ib, atol=1e-5 if k == 1.0 else 5e-3)
        x0 = torch.rand((2, *a.sample_shape), generator=torch.Generator().manual_seed(2)) * 2 - 1
        t, eps = torch.tensor([100, 700]), torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
        na, nb = a.noise(x0, t, eps), b.noise(x0, t, eps)
        assert torch.allclose(na.target, nb.target, atol=1e-6)
        cond = a.encode_prompts(prompts)
        ea, eb = a.error(na, cond), b.error(nb, cond)
    expected = ea if k == 1.0 else ea / a._alpha(t).float()  # ε's error in v-space is weighted by 1/ᾱ
    assert torch.allclose(eb, expected, rtol=1e-4)


def test_pretraining_with_a_learned_k_declares_it_and_loads(tmp_path):
    from dataclasses import replace

    from visalign.models.pixel import PixelBackbone
    from visalign.worlds.shapes.base import PretrainConfig, pretrain

    cfg = PretrainConfig(steps=3, batch_size=4, block_out_channels=(16, 32), text_hidden=32, text_layers=1,
                         warmup_steps=1, bf16=False, save_every=100, lr=5e-2, prediction_type="k", k=1.0,
                         learn_k=True)
    out = pretrain(cfg, tmp_path / "k", log_every=1)
    declared = json.loads((out / "visalign_parameterisation.json").read_text())
    assert declared["target"] == "k" and declared["learned"] and declared["k"] != pytest.approx(1.0, abs=1e-4)
    log = json.loads((out / "training_log.json").read_text())
    assert [round(r["k"], 6) for r in log][0] != round(declared["k"], 6)  # k moved during training
    bb = PixelBackbone(str(out))
    assert bb.kdiff_k == pytest.approx(declared["k"])
    # k's own learning rate: the same run with a 100x smaller one moves k 100x less (Adam's steps scale with lr)
    slow = pretrain(replace(cfg, k_lr=5e-4), tmp_path / "slow", log_every=1)
    moved_slow = abs(json.loads((slow / "visalign_parameterisation.json").read_text())["k"] - 1.0)
    assert moved_slow == pytest.approx(abs(declared["k"] - 1.0) / 100, rel=0.05)
    with torch.no_grad():
        images = bb.sample(["a photo of a red circle"], steps=3, guidance=1.5).images
    assert images.shape[0] == 1 and torch.isfinite(images).all()


def test_the_shipped_kdiff_config_reads_through_the_pretrain_command(tmp_path):
    from pathlib import Path

    from visalign.config import load_section
    from visalign.worlds.shapes.base import PretrainConfig

    file = Path(__file__).resolve().parents[1] / "configs/pretrain/shapes_kdiff.yaml"
    cfg = load_section(PretrainConfig, [str(file)], {}, ["steps=3"], "pretrain")
    assert (cfg.prediction_type, cfg.k, cfg.learn_k, cfg.k_lr, cfg.steps) == ("k", 1.0, True, 1e-2, 3)


def test_bad_k_settings_and_files_are_one_line_errors(tiny_dir, tmp_path, capsys):
    from visalign.cli import main

    assert main(["world", "shapes", "pretrain", "--out", str(tmp_path / "m"), "prediction_type=k", "k=3"]) == 2
    assert "pretrain.k=3" in capsys.readouterr().err
    assert main(["world", "shapes", "pretrain", "--out", str(tmp_path / "m"), "prediction_type=x"]) == 2
    assert "pretrain.prediction_type='x'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("k_rate: 0.1\n")
    assert main(["world", "shapes", "pretrain", "-c", str(bad), "--out", str(tmp_path / "m")]) == 2
    assert "unknown key pretrain.k_rate" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir("pixel"), broken)
    (broken / "visalign_parameterisation.json").write_text(json.dumps({"target": "k", "k": "one"}))
    assert main(["eval", "geneval", "--model", str(broken), "--out", str(tmp_path / "g"), "--per-task", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "visalign_parameterisation.json" in err and "[0, 2]" in err


def test_the_kdiff_comparison_script_runs_each_target_and_writes_its_table(tmp_path, capsys):
    from helpers import load_script

    mod = load_script("kdiff_shapes")
    mod.main(["--out", str(tmp_path), "--steps", "2", "--batch-size", "2", "--per-task", "1", "--threads", "1",
              "--variants", "x (k=2),learned k (from 1)"])
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["x (k=2)", "learned k (from 1)"]
    assert rows[0]["k_final"] == 2.0 and rows[1]["learned"] and rows[1]["n"] == 6 and rows[1]["fid"] > 0
    assert "| x (k=2) | 2.00 -> 2.000 |" in (tmp_path / "table.md").read_text()
