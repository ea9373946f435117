"""Online methods (GRPO, DisCO): the policy-gradient math against scalar formulas, the ratio at 1 before the
first update, the KL at 0 at init, and a few steps from the CLI on every tiny family, LoRA and full."""

import math

import pytest
import torch
from helpers import Redness, family_variants, finetune_args  # noqa: F401  (Redness: the test_redness reward)

from visalign.objectives.policy import clipped_surrogate, disco_objective, group_advantages, k3_kl


def test_group_advantages_match_a_loop_and_drop_flat_groups():
    rewards = torch.tensor([[0.2, 0.4, 0.9, 0.5], [0.7, 0.7, 0.7, 0.7], [1.0, 0.0, 0.0, 1.0]])
    adv, keep = group_advantages(rewards, "group", eps=0.0 + 1e-4)
    assert keep.tolist() == [True, False, True]
    for p in (0, 2):
        row = rewards[p].tolist()
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / len(row))
        for g, r in enumerate(row):
            assert adv[p, g].item() == pytest.approx((r - mean) / (std + 1e-4), rel=1e-5, abs=1e-5)
    assert adv[1].abs().max() == 0
    batch_adv, _ = group_advantages(rewards, "batch")
    flat = rewards.flatten().tolist()
    mean_all = sum(flat) / len(flat)
    std_all = math.sqrt(sum((r - mean_all) ** 2 for r in flat) / len(flat))
    assert batch_adv[0, 2].item() == pytest.approx((0.9 - sum(rewards[0].tolist()) / 4) / (std_all + 1e-4), rel=1e-5)


@pytest.mark.parametrize("logp,old,adv", [(0.3, 0.1, 1.5), (0.1, 0.3, 1.5), (0.3, 0.1, -2.0), (-0.2, 0.1, -0.7),
                                          (0.05, 0.05, 0.9)])
def test_clipped_surrogate_against_the_scalar_formula(logp, old, adv):
    eps = 0.1
    ratio = math.exp(logp - old)
    expected = -min(ratio * adv, max(min(ratio, 1 + eps), 1 - eps) * adv)
    got = clipped_surrogate(torch.tensor(logp), torch.tensor(old), torch.tensor(adv), eps)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_k3_kl_is_zero_at_equality_and_estimates_the_gaussian_kl():
    x = torch.randn(10)
    assert torch.equal(k3_kl(x, x), torch.zeros(10))
    # samples of p = N(0, 1); q = N(0.5, 1): KL(p ‖ q) = 0.5² / 2
    g = torch.Generator().manual_seed(0)
    s = torch.randn(200_000, generator=g)
    logp, logq = -0.5 * s ** 2, -0.5 * (s - 0.5) ** 2
    est = k3_kl(logp, logq)
    assert (est >= -1e-6).all() and est.mean().item() == pytest.approx(0.125, abs=0.005)


def test_disco_objective_by_hand():
    score = torch.tensor([1.2, 0.8, 1.0, 0.9])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    inside = disco_objective(score, adv, torch.tensor(5e-5), delta=1e-4, beta=1e3)
    assert inside.item() == pytest.approx(-((1.2 + 1.0) / 2 - (0.8 + 0.9) / 2))
    outside = disco_objective(score, adv, torch.tensor(3e-4), delta=1e-4, beta=1e3)
    assert outside.item() == pytest.approx(inside.item() + 1e3 * (2e-4) ** 2)


@pytest.mark.parametrize("method", ["grpo", "disco"])
def test_ratio_is_one_before_the_first_update_and_kl_zero_at_init(tiny_dir, method):
    from visalign.config import Component
    from visalign.models.lora import LoraSpec, add_lora
    from visalign.models.pixel import PixelBackbone
    from visalign.train.build import build_method

    bb = PixelBackbone(str(tiny_dir("pixel")))
    add_lora(bb, LoraSpec(init="gaussian"))
    m = build_method(Component(method, {"group_size": 4, "prompts_per_round": 3, "steps": 4, "window": 2,
                                        "reward": "test_redness"}), guidance=2.0)
    items = m.make_round(bb, ["a photo of a red circle", "a photo of two squares"], torch.Generator().manual_seed(0))
    n = m.round_size(items)
    assert n == 12 and items["adv"].shape == (12,) and items["traj"].shape[1] == 3  # the window's 2 steps kept
    batch = m.take(items, torch.arange(n))  # the whole round, in the sampler's order: the same forward
    steps = m.trained_steps(batch.extras["logp"])
    assert steps.tolist() == [0, 1]
    with torch.no_grad():
        logp = m.window_logprobs(bb, batch, steps)
        ref = m.window_logprobs(bb, batch, steps, reference=True)
    assert torch.equal(torch.exp(logp - batch.extras["logp"][:, steps]), torch.ones_like(logp))
    assert k3_kl(logp, ref).abs().max().item() < 1e-6  # LoRA's B starts at 0: the policy is the reference


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("family", family_variants())
@pytest.mark.parametrize("method", ["grpo", "disco", "online_dpo"])
def test_online_methods_train_from_the_cli(tiny_dir, tmp_path, family, method, lora):
    import json

    from visalign.cli import main

    out = tmp_path / "run"
    argv = ["finetune", *finetune_args(family, tiny_dir(family)), "data.path=shapes:train",
            f"objective.name={method}", "objective.prompts_per_round=2", "objective.round_steps=2",
            "objective.steps=3", "objective.reward=test_redness",
            *(["objective.samples_per_prompt=3", "objective.min_margin=0"] if method == "online_dpo" else
              ["objective.group_size=2", "objective.window=2"]),
            f"train.output_dir={out}", "train.steps=3", "train.batch_size=2", "train.lr=1e-3", "train.save_every=0",
            "train.log_every=1", "train.threads=1", "train.tracker=none", "train.mixed_precision=no",
            f"lora.enabled={str(lora).lower()}"]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("reward_mean" in r and math.isfinite(r["loss"]) for r in rows)
    assert (out / ("lora" if lora else "model")).exists()


def test_d3po_pairs_need_a_margin_and_rounds_are_fresh(tiny_dir):
    from visalign.models.pixel import PixelBackbone
    from visalign.objectives.d3po import D3PO

    bb = PixelBackbone(str(tiny_dir("pixel")))
    prompts = ["a photo of a red circle", "a photo of two squares"]
    default = D3PO()
    assert default.round_steps * 8 <= default.prompts_per_round  # 32 pairs, 4 steps of 8: each about once
    every = D3PO(steps=3, prompts_per_round=6, guidance=2.0, reward="test_redness")
    items = every.make_round(bb, prompts, torch.Generator().manual_seed(0))
    assert len(items["prompts"]) == 6
    # the round's mean reward (all 12 rollouts) rides with every batch of the round into the step's logged
    # metrics (the loop merges batch.log): D3PO's training-reward curve, as every online method's
    from visalign.objectives.online import RoundSource

    source = RoundSource(every, bb, prompts, batch_size=2, grad_accum=1, seed=0)
    batch = source.batch(0)
    assert 0.0 <= source.items["log"]["reward_mean"] <= 1.0
    assert batch.log == source.items["log"] and batch.to("cpu").log == batch.log
    assert every.make_round(bb, prompts, torch.Generator().manual_seed(0))["log"] == items["log"]
    strict = D3PO(steps=3, prompts_per_round=6, guidance=2.0, reward="test_redness", min_margin=1e9)
    none = strict.make_round(bb, prompts, torch.Generator().manual_seed(0))
    assert none["prompts"] == [] and strict.take(none, torch.arange(4)) is None
    assert default.reward.name == "constraints"  # no cleanliness term deciding ties
