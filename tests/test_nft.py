"""DiffusionNFT and the online levers: the loss against a scalar computation, zero gradient at neutral rewards,
x0 predictions of every family, the faithful reward on hand-built scenes, reward ensembles, rounds balanced by
task, per-prompt advantage statistics, and NFT from the CLI with an exact resume of its old policy."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import Redness, family_variants, finetune_args  # noqa: F401  (Redness: the test_redness reward)

from visalign.objectives.nft import adaptive_mse, nft_loss, nft_optimality


def scalar_nft(x_theta, x_old, x0, r, beta):
    """The loss of one image with plain Python floats, term by term as the paper writes it."""
    pos = [beta * a + (1 - beta) * b for a, b in zip(x_theta, x_old)]
    neg = [(1 + beta) * b - beta * a for a, b in zip(x_theta, x_old)]

    def term(pred):
        d = [p - t for p, t in zip(pred, x0)]
        w = max(sum(abs(v) for v in d) / len(d), 1e-5)
        return sum(v * v for v in d) / len(d) / w

    return (r * term(pos) + (1 - r) * term(neg)) / beta


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.1])
def test_nft_loss_matches_a_scalar_computation(beta):
    g = torch.Generator().manual_seed(0)
    x_theta, x_old, x0 = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    r = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    got = nft_loss(x_theta, x_old, x0, r, beta)
    for i in range(3):
        want = scalar_nft(x_theta[i].flatten().tolist(), x_old[i].flatten().tolist(), x0[i].flatten().tolist(),
                          float(r[i]), beta)
        assert math.isclose(float(got[i]), want, rel_tol=1e-6)


def test_neutral_rewards_give_zero_gradient_at_the_old_policy():
    g = torch.Generator().manual_seed(1)
    x_old, x0 = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    x_theta = x_old.clone().requires_grad_(True)
    nft_loss(x_theta, x_old, x0, torch.full((4,), 0.5), beta=1.0).sum().backward()
    assert x_theta.grad.abs().max().item() < 1e-6
    # a positive image pulls the policy toward itself: the gradient is that of the denoising loss
    x_theta.grad = None
    nft_loss(x_theta, x_old, x0, torch.ones(4), beta=1.0).sum().backward()
    direct = x_old.clone().requires_grad_(True)
    adaptive_mse(direct, x0).sum().backward()
    assert torch.allclose(x_theta.grad, direct.grad, atol=1e-6)


def test_optimality_maps_clipped_advantages_to_unit_interval():
    adv = torch.tensor([-9.0, -5.0, -2.5, 0.0, 2.5, 5.0, 7.0])
    assert nft_optimality(adv, 5.0).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.parametrize("family", family_variants())
def test_x0_prediction_of_the_true_target_is_x0(tiny_dir, family):
    """For ε, v and flow families: the x0 implied by the exact target is the clean sample."""
    from helpers import family_of

    _, cls = family_of(family)
    bb = cls(str(tiny_dir(family)), **cls.tiny_kwargs)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, *bb.sample_shape, generator=g)
    noised = bb.noise(x0, t=torch.tensor([10, 500, 990]).to(bb.device), eps=torch.randn(x0.shape, generator=g))
    got = bb.x0_prediction(noised.target, noised.x_t, noised.t)
    assert torch.allclose(got, x0, atol=1e-3), (got - x0).abs().max()


def test_nft_round_starts_neutral_and_its_old_policy_is_an_ema(tiny_dir):
    from visalign.config import Component
    from visalign.models.lora import LoraSpec, add_lora
    from visalign.models.pixel import PixelBackbone
    from visalign.train.build import build_method

    bb = PixelBackbone(str(tiny_dir("pixel")))
    add_lora(bb, LoraSpec(init="gaussian"))
    m = build_method(Component("nft", {"group_size": 3, "prompts_per_round": 2, "steps": 3,
                                       "reward": "test_redness", "old_ema": 0.25}), guidance=2.0)
    assert m.param_groups(bb) == []  # the old policy is not trained
    items = m.make_round(bb, ["a photo of a red circle", "a photo of two squares"], torch.Generator().manual_seed(0))
    batch = m.take(items, torch.arange(m.round_size(items)))
    batch.extras["r"] = torch.full_like(batch.extras["r"], 0.5)
    m(bb, batch).loss.backward()
    grads = [p.grad for p in bb.unwrapped().parameters() if p.requires_grad and p.grad is not None]
    assert grads and max(g.abs().max().item() for g in grads) < 1e-6  # θ = old, r = 1/2: nothing moves
    params = dict(bb.unwrapped().named_parameters())
    name = next(n for n in params if ".default." in n and "lora_B" in n)
    with torch.no_grad():
        params[name].add_(1.0)
    old_before = params[name.replace(".default.", ".old.")].detach().clone()
    m.update_old(bb, 1)
    m.update_old(bb, 1)  # a replayed round (after a resume) does not apply the EMA twice
    want = 0.25 * old_before + 0.75 * params[name].detach()
    assert torch.allclose(params[name.replace(".default.", ".old.")], want)
    assert m.state_dict()["old_round"] == 1


def test_nft_needs_lora(tiny_dir, tmp_path, capsys):
    from visalign.cli import main

    rc = main(["finetune", *finetune_args("pixel", tiny_dir("pixel")), "data.path=shapes:train",
               "objective.name=nft", "lora.enabled=false", f"train.output_dir={tmp_path / 'r'}",
               "train.steps=1", "train.tracker=none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "lora.enabled=true" in err[0]


@pytest.mark.parametrize("family", family_variants())
def test_nft_trains_from_the_cli(tiny_dir, tmp_path, family):
    from visalign.cli import main

    out = tmp_path / "run"
    argv = ["finetune", *finetune_args(family, tiny_dir(family)), "data.path=shapes:train", "objective.name=nft",
            "objective.prompts_per_round=2", "objective.group_size=2", "objective.round_steps=2",
            "objective.steps=3", "objective.reward=test_redness", "objective.kl_coef=0.1",
            f"train.output_dir={out}", "train.steps=3", "train.batch_size=2", "train.lr=1e-3", "train.save_every=0",
            "train.log_every=1", "train.threads=1", "train.tracker=none", "train.mixed_precision=no"]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and "kl" in r and "r_mean" in r for r in rows)
    assert (out / "lora").exists()


def test_nft_resumes_exactly_across_a_round(tiny_dir, tmp_path):
    """Checkpoints at round ends; killed after one, resumed: the old policy's EMA is not applied twice."""
    from visalign.cli import main

    def run(out, steps, resume=False):
        argv = ["finetune", *finetune_args("pixel", tiny_dir("pixel")), "data.path=shapes:train",
                "objective.name=nft", "objective.prompts_per_round=2", "objective.group_size=2",
                "objective.round_steps=3", "objective.steps=3", "objective.reward=test_redness",
                f"train.output_dir={out}", f"train.steps={steps}", "train.batch_size=2", "train.lr=1e-3",
                "train.save_every=2", "train.threads=1", "train.tracker=none", "train.mixed_precision=no",
                *(["train.resume=latest"] if resume else [])]
        assert main(argv) == 0
        return json.loads((out / "summary.json").read_text())["weights_sha256"]

    import shutil

    straight = run(tmp_path / "a", 5)
    assert run(tmp_path / "b", 5) == straight  # deterministic
    # saves due at steps 2 and 4 (inside rounds of 3 steps) wait for the round's end: step 3 (then 6 > 5)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-0000003"]
    shutil.rmtree(tmp_path / "b" / "lora")  # as if killed after that checkpoint
    (tmp_path / "b" / "summary.json").unlink()
    assert run(tmp_path / "b", 5, resume=True) == straight


# --- the faithful reward, ensembles ------------------------------------------------------------------

def scene(*objs):
    from visalign.worlds.shapes.render import ShapeObject, draw

    img = draw([ShapeObject(s, c, box) for s, c, box in objs])
    return torch.from_numpy(img).permute(2, 0, 1).float() / 255


RED_CIRCLE = ("circle", "red", (2, 2, 10, 10))
BLUE_SQUARE = ("square", "blue", (14, 2, 22, 10))
GREEN_TRIANGLE = ("triangle", "green", (2, 16, 11, 25))
RED_CIRCLE_2 = ("circle", "red", (16, 16, 24, 24))


def test_faithful_charges_exactly_per_unrequested_object():
    from visalign.registry import REWARDS

    faithful = REWARDS.build("faithful", charge=0.3)
    prompt = "a photo of a red circle and a blue square"
    images = torch.stack([scene(RED_CIRCLE, BLUE_SQUARE), scene(RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE),
                          scene(RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE, RED_CIRCLE_2)])
    got = faithful(images, [prompt] * 3).tolist()
    assert got == pytest.approx([1.0, 0.7, 0.4])  # all constraints met; one, then two extra objects
    # counting: one circle too many fails the exclude clause (GenEval's rule) and costs one charge on top
    two = "a photo of two circles"
    got = faithful(torch.stack([scene(RED_CIRCLE, RED_CIRCLE_2), scene(RED_CIRCLE, RED_CIRCLE_2,
                                                                       ("circle", "blue", (2, 16, 10, 24)))]),
                   [two, two]).tolist()
    assert got == pytest.approx([1.0, 0.5 - 0.3])
    assert REWARDS.build("unrequested")(images, [prompt] * 3).tolist() == [0.0, -1.0, -2.0]


def test_a_reward_ensemble_adds_weighted_terms_and_logs_each():
    from visalign.registry import REWARDS
    from visalign.rewards.base import LazyReward

    prompt = "a photo of a red circle and a blue square"
    images = torch.stack([scene(RED_CIRCLE, BLUE_SQUARE), scene(RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE),
                          scene(RED_CIRCLE)])
    mix = LazyReward([{"name": "constraints", "weight": 1.0}, {"name": "unrequested", "weight": 0.25}])
    got = mix(images, [prompt] * 3)
    assert torch.allclose(got, REWARDS.build("faithful", charge=0.25)(images, [prompt] * 3))
    assert set(mix.term_means()) == {"reward_constraints", "reward_unrequested"}
    assert mix.term_means()["reward_unrequested"] == pytest.approx(-1 / 3)
    assert torch.allclose(LazyReward({"constraints": 1.0, "unrequested": 0.25})(images, [prompt] * 3), got)
    assert LazyReward("constraints").term_means() == {}  # one reward: its mean is reward_mean already


def test_a_non_finite_reward_is_refused_where_it_enters():
    from visalign.errors import UserError
    from visalign.registry import REWARDS
    from visalign.rewards.base import LazyReward

    @REWARDS.register("test_nan_reward")
    class NanReward:
        name, version = "test_nan_reward", "1"

        def __call__(self, images, prompts):
            return torch.tensor([0.5, float("nan")])

    with pytest.raises(UserError, match="test_nan_reward.*non-finite"):
        LazyReward("test_nan_reward")(torch.zeros(2, 3, 8, 8), ["a", "b"])


@pytest.mark.parametrize("value,why", [
    ("[{name: constraints, weight: x}]", "weight"),
    ("[{name: constraintz}]", "constraintz"),
    ("[{name: faithful, chargez: 1}]", "chargez"),
])
def test_bad_reward_ensembles_are_refused_in_one_line(tmp_path, capsys, value, why):
    from visalign.cli import main

    rc = main(["config", "shapes", "-c", "configs/shapes/nft.yaml", f"objective.reward={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and why in err[0], err


def test_an_empty_ensemble_is_refused():
    from visalign.component_args import reward_ensemble
    from visalign.registry import ConfigError

    with pytest.raises(ConfigError, match="empty"):
        reward_ensemble([], "objective.reward", None)


def test_an_ensemble_from_the_command_line_reaches_the_method():
    from visalign.config import load_config
    from visalign.train.build import build_method

    cfg = load_config("shapes", ["configs/shapes/grpo.yaml"],
                      ["objective.reward={constraints: 1.0, faithful: 0.5}"])
    m = build_method(cfg.objective, guidance=1.5)
    assert [(label, w) for label, _, w in m.reward.parts] == [("constraints", 1.0), ("faithful", 0.5)]


# --- rounds balanced by task, per-prompt statistics --------------------------------------------------

def test_balanced_rounds_draw_the_configured_task_mix():
    from visalign.data.prompts import read_prompt_tags, read_prompts
    from visalign.objectives.online import PromptPool, draw_prompts
    from visalign.worlds.shapes.captions import parse_caption  # noqa: F401  (ShapesWorld registered)
    from visalign.worlds.shapes.render import prompt_records

    prompts, tags = read_prompts("shapes:train"), read_prompt_tags("shapes:train")
    assert tags == [r["tag"] for r in prompt_records("train")]
    weights = {"counting": 3.0, "single_object": 0.0}
    pool = PromptPool(prompts, tags, weights)
    drawn = pool.draw(6000, torch.Generator().manual_seed(0))
    tag_of = dict(zip(prompts, tags))
    share = {t: sum(tag_of[p] == t for p in drawn) / len(drawn) for t in set(tags)}
    total = 3.0 + 4 * 1.0  # counting 3, single objects 0, the four others 1
    assert share["single_object"] == 0
    assert abs(share["counting"] - 3 / total) < 0.02
    for t in ("two_object", "colors", "position", "color_attr"):
        assert abs(share[t] - 1 / total) < 0.02
    # without weights the draw is exactly the one earlier runs made
    plain = PromptPool(prompts)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert draw_prompts(plain, 8, g1) == [prompts[i] for i in torch.randint(0, len(prompts), (8,), generator=g2)]


def test_task_weights_need_tags_and_known_tasks():
    from visalign.errors import UserError
    from visalign.objectives.online import PromptPool

    with pytest.raises(UserError, match="task tags"):
        PromptPool(["a", "b"], None, {"counting": 2.0})
    with pytest.raises(UserError, match="data.task_weights.countng"):
        PromptPool(["a", "b"], ["counting", "colors"], {"countng": 2.0})


def test_per_prompt_stats_against_an_independent_computation():
    from visalign.objectives.policy import PromptStats

    stats = PromptStats(buffer=4, min_count=3)
    rng = np.random.default_rng(0)
    history: dict[str, list[float]] = {}
    for _ in range(4):
        prompts = ["a", "a", "b", "b", "b", "c"]
        rewards = rng.random(6)
        got = stats.advantages(prompts, torch.tensor(rewards, dtype=torch.float32))
        for c in set(prompts):
            history[c] = (history.get(c, []) + [float(r) for p, r in zip(prompts, rewards) if p == c])[-4:]
        for i, (p, r) in enumerate(zip(prompts, rewards)):
            h = history[p] if len(history[p]) >= 3 else list(rewards)
            want = (r - np.mean(h)) / (np.std(h) + 1e-4)
            assert math.isclose(float(got[i]), want, rel_tol=1e-4, abs_tol=1e-4)
    again = PromptStats(buffer=4, min_count=3)
    again.load_state_dict(json.loads(json.dumps(stats.state_dict())))
    assert again.state_dict() == stats.state_dict()
