"""Online rollouts (issue #35, levers 7 and 8): bf16 rollouts whose ratio is exactly 1 before the first update,
and a real noisy window (η inside the trained steps, the ODE outside, MixGRPO's slide), checked against an
independent deterministic sampler run."""

import math

import pytest
import torch
from helpers import Redness, finetune_args  # noqa: F401  (Redness: the test_redness reward)

PROMPTS = ["a photo of a red circle", "a photo of two squares"]


def _method(name: str, **kwargs):
    from visalign.config import Component
    from visalign.train.build import build_method

    args = {"group_size": 4, "prompts_per_round": 2, "steps": 6, "window": 2, "reward": "test_redness"} | kwargs
    return build_method(Component(name, args), guidance=2.0)


def _backbone(tiny_dir, family: str = "pixel"):
    from helpers import family_of

    from visalign.config import Component
    from visalign.models.load import build_backbone
    from visalign.models.lora import LoraSpec, add_lora

    bb = build_backbone(Component(family_of(family)[0], {"path": str(tiny_dir(family))}))
    add_lora(bb, LoraSpec(init="gaussian"))
    return bb


def _round(method, bb, round_idx: int = 0, seed: int = 0) -> dict:
    with torch.no_grad(), bb.rollout_sampling():
        return method.make_round(bb, PROMPTS, torch.Generator().manual_seed(seed), round_idx)


@pytest.mark.parametrize("method", ["grpo", "disco"])
def test_bf16_rollouts_keep_the_ratio_exactly_one_before_the_first_update(tiny_dir, method):
    bb = _backbone(tiny_dir)
    m = _method(method)
    fp32 = _round(m, bb)
    bb.rollout_dtype = torch.bfloat16
    items = _round(m, bb)
    # the rollouts really are bf16: the same seeds give other states and densities than fp32's
    assert not torch.equal(items["traj"], fp32["traj"])
    batch = m.take(items, torch.arange(m.round_size(items)))
    steps = m.trained_steps(batch.extras["logp"])
    assert steps.tolist() == [0, 1]
    logp, logp_old, _ = m.policy_and_old(bb, batch)  # with grad, as the training step computes it
    assert torch.equal(torch.exp(logp - logp_old), torch.ones_like(logp))
    out = m(bb, batch)
    out.loss.backward()  # gradients flow through the autocast forward into the fp32 adapters
    grads = [p.grad for p in bb.unwrapped().parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # the step's own figure of the same fact: GRPO's mean ratio, DisCO's KL(π_old ‖ π_θ) estimate
    assert out.metrics["ratio"] == 1.0 if method == "grpo" else out.metrics["kl"] == 0.0


def test_window_steps_slide_one_step_every_k_rounds_and_wrap():
    m = _method("grpo", steps=6, window=2, window_slide=3)
    starts = [m.window_steps(r).start for r in range(15)]
    # starts 0 .. steps-1-window = 3: the last step (onto the data, no density) is never trained
    assert starts == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0, 0]
    assert all(len(m.window_steps(r)) == 2 for r in range(15))
    assert list(_method("grpo", window=0).window_steps(5)) == list(range(6))
    for bad in ({"noise": "some"}, {"window": 6}, {"window_slide": -1}, {"window": 0, "window_slide": 2}):
        with pytest.raises(ValueError):
            _method("grpo", **bad)


@pytest.mark.parametrize("family", ["pixel", "sd3"])
def test_noisy_window_is_the_ode_outside_and_stores_only_the_window(tiny_dir, family):
    bb = _backbone(tiny_dir, family)
    m = _method("grpo", noise="window", window_slide=1)
    window = m.window_steps(2)  # round 2: the window is steps 2, 3 of 6
    assert list(window) == [2, 3]
    x_T = torch.randn((4, *bb.sample_shape), generator=torch.Generator().manual_seed(9))
    kw = dict(steps=6, guidance=2.0, trajectory=True, latents=x_T)
    with torch.no_grad():
        mixed = bb.sample(PROMPTS * 2, eta=m.sampler_eta(window), generator=torch.Generator().manual_seed(1), **kw)
        ode = bb.sample(PROMPTS * 2, eta=0.0, **kw)  # the scheduler's own deterministic steps
    # before the window the sampler is the deterministic one: the states of a pure ODE run
    for s in (1, 2):
        assert torch.allclose(mixed.trajectory[s], ode.trajectory[s], atol=1e-5)
    assert not torch.allclose(mixed.trajectory[4], ode.trajectory[4], atol=1e-3)  # noise entered in the window
    assert torch.isfinite(mixed.log_probs).all(0).tolist() == [False, False, True, True, False, False]
    items = _round(m, bb, 2)
    n = m.round_size(items)
    assert items["traj"].shape[1] == 3 and items["logp"].shape == (n, 2)  # states 2..4, densities of steps 2, 3
    assert torch.equal(items["timesteps"], bb.sampling_scheduler(6).timesteps[2:4].cpu())
    assert items["log"]["window_start"] == 2.0
    batch = m.take(items, torch.arange(n))
    with torch.no_grad():
        logp, logp_old, steps = m.policy_and_old(bb, batch)
    assert steps.tolist() == [0, 1] and torch.equal(logp, logp_old)


def test_all_noise_round_keeps_the_window_slice_of_the_full_trajectory(tiny_dir):
    """noise='all' (the earlier sampler): η at every step; the round keeps the window's slice of the trajectory
    a full sampler call returns from the same draws."""
    from visalign.objectives.online import draw_prompts

    bb = _backbone(tiny_dir)
    m = _method("grpo", window=3)
    items = _round(m, bb)
    gen = torch.Generator().manual_seed(0)  # make_round's draws, in its order: prompts, x_T, the sampler's noise
    chosen = draw_prompts(PROMPTS, 2, gen)
    x_T = torch.randn((8, *bb.sample_shape), generator=gen)
    with torch.no_grad():
        full = bb.sample([c for c in chosen for _ in range(4)], steps=6, guidance=2.0, eta=1.0, trajectory=True,
                         latents=x_T, generator=gen)
    assert m.round_size(items) == 8  # no group of random images ties on redness
    assert torch.equal(items["traj"], torch.stack(full.trajectory[:4], 1))
    assert torch.equal(items["logp"], full.log_probs[:, :3])


def test_rollout_precision_trains_from_the_cli_and_is_refused_offline(tiny_dir, tmp_path, capsys):
    import json

    from visalign.cli import main

    out = tmp_path / "run"
    argv = ["finetune", *finetune_args("pixel", tiny_dir("pixel")), "data.path=shapes:train",
            "objective.name=grpo", "objective.prompts_per_round=2", "objective.round_steps=2", "objective.steps=4",
            "objective.reward=test_redness", "objective.group_size=2", "objective.window=2",
            "objective.noise=window", "objective.window_slide=1", "train.rollout_precision=bf16",
            f"train.output_dir={out}", "train.steps=3", "train.batch_size=2", "train.lr=1e-3", "train.save_every=0",
            "train.log_every=1", "train.threads=1", "train.tracker=none"]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert [r["window_start"] for r in rows] == [0.0, 0.0, 1.0]  # round 0: steps 1-2, round 1: step 3
    capsys.readouterr()
    assert main(["finetune", *finetune_args("pixel", tiny_dir("pixel")), "objective.name=diffusion_dpo",
                 "train.rollout_precision=bf16", f"train.output_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.rollout_precision=bf16" in err[0] and "grpo" in err[0]
