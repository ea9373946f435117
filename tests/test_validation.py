"""Checkpoint choice on a validation split of the *training* prompts (issue #35, lever 5): the split is
disjoint from the held-out split and from every round, each evaluation is scored per task, and the run keeps
the best-scoring weights and says why."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from visalign.data.prompts import read_prompt_tags, read_prompts, validation_split
from visalign.registry import REWARDS
from visalign.train.guardrail import best_evaluation, task_scores


def test_the_validation_split_is_disjoint_from_held_out_and_training_and_order_free():
    prompts, tags = read_prompts("shapes:train"), read_prompt_tags("shapes:train")
    keep, held = validation_split(prompts, tags, 0.2)
    train, val = {prompts[i] for i in keep}, {prompts[i] for i in held}
    assert val and not val & train and not val & set(read_prompts("shapes:eval"))
    assert sorted(keep + held) == list(range(len(prompts)))
    for task in set(tags):  # every task keeps at least one training prompt
        assert any(tags[i] == task for i in keep)
    big = [t for t in set(tags) if tags.count(t) >= 10]
    for task in big:  # and gives about the fraction of its prompts
        n = tags.count(task)
        assert sum(tags[i] == task for i in held) == round(0.2 * n)
    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)
    _, held2 = validation_split([prompts[i] for i in order], [tags[i] for i in order], 0.2)
    assert {prompts[order[i]] for i in held2} == val  # chosen by the texts, not their order
    # an independent choice: per task, the round(0.2 n) smallest SHA-1s of the prompt texts
    expect = set()
    for task in set(tags):
        mine = sorted((p for p, g in zip(prompts, tags) if g == task),
                      key=lambda p: hashlib.sha1(p.encode()).hexdigest())
        expect |= set(mine[:min(len(mine) - 1, round(0.2 * len(mine)))])
    assert val == expect


def test_task_scores_weigh_every_task_once():
    values = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0])
    tags = ["a", "b", "b", "b", "c"]
    score, per = task_scores(values, tags)
    assert per == {"a": 1.0, "b": 0.0, "c": 1.0} and score == pytest.approx(2 / 3)
    assert task_scores(values, None) == (pytest.approx(0.4), {})


def test_best_evaluation_picks_the_highest_score_and_the_earliest_tie():
    rows = [{"step": 2, "score": 0.3, "gold": 0.9}, {"step": 4, "score": 0.7, "gold": 0.1},
            {"step": 6, "score": 0.7, "gold": 0.5}, {"step": 8, "score": 0.2}]
    assert best_evaluation(rows)["step"] == 4  # by score, not by gold
    assert best_evaluation([{"step": 1, "gold": 0.2}, {"step": 3, "gold": 0.4}])["step"] == 3  # older logs
    assert best_evaluation([]) is None


@REWARDS.register("test_scripted_validation")
class ScriptedValidation:
    """A fixed score per evaluation (a constructed run whose best evaluation is known)."""

    name, version = "test_scripted_validation", "1"
    schedule = [0.2, 0.8, 0.5]
    calls = 0

    def __call__(self, images, prompts):
        value = ScriptedValidation.schedule[ScriptedValidation.calls % len(ScriptedValidation.schedule)]
        ScriptedValidation.calls += 1
        return torch.full((len(images),), value)


@REWARDS.register("test_recording")
class Recording:
    """Redness, remembering every prompt a round asked it to score."""

    name, version = "test_recording", "1"
    seen: set[str] = set()

    def __call__(self, images, prompts):
        Recording.seen |= set(prompts)
        return (images[:, 0] - images[:, 1]).float().mean((1, 2))


def _online(tiny, out, steps, *extra):
    return ["finetune", "shapes", f"model.path={tiny}", "data.path=shapes:train", "objective.name=online_dpo",
            "objective.prompts_per_round=4", "objective.round_steps=2", "objective.steps=2",
            "objective.samples_per_prompt=2", "objective.min_margin=0", "objective.reward=test_recording",
            f"train.output_dir={out}", f"train.steps={steps}", "train.batch_size=2", "train.lr=1e-3",
            "train.save_every=0", "train.log_every=1", "train.threads=1", "train.tracker=none",
            "train.mixed_precision=no", "data.validation_fraction=0.2", *extra]


def test_a_run_keeps_the_best_validation_checkpoint_and_says_why(tiny_dir, tmp_path, capsys):
    from visalign.cli import main

    ScriptedValidation.calls, Recording.seen = 0, set()
    out = tmp_path / "run"
    assert main(_online(tiny_dir("pixel"), out, 6, "train.gold_reward=test_scripted_validation",
                        "train.gold_prompts=validation", "train.gold_every=2", "train.gold_samples=6",
                        "train.sample_steps=2", "train.select_best=gold")) == 0
    prompts, tags = read_prompts("shapes:train"), read_prompt_tags("shapes:train")
    _, held = validation_split(prompts, tags, 0.2)
    assert Recording.seen and not Recording.seen & {prompts[i] for i in held}  # no round drew a validation prompt
    rows = [json.loads(x) for x in (out / "gold.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6] and all(any(k.startswith("task/") for k in r) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_step"] == 4 and summary["best_gold"] == pytest.approx(0.8)
    line = (out / "selection.log").read_text()
    assert "kept the weights of step 4" in line and "best of 3 evaluations" in line and "step 6" in line
    assert "kept the weights of step 4" in capsys.readouterr().out
    kept = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert main(_online(tiny_dir("pixel"), tmp_path / "short", 4)) == 0  # the same run stopped at step 4
    short = load_file(tmp_path / "short" / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.allclose(kept[k], short[k], atol=1e-6) for k in kept)


def test_validation_needs_a_fraction_and_prompt_rounds():
    from visalign.config import load_config
    from visalign.registry import ConfigError

    with pytest.raises(ConfigError, match="data.validation_fraction=F"):
        load_config("shapes", [], ["train.gold_prompts=validation"])
    with pytest.raises(ConfigError, match="fixed data"):
        load_config("shapes", [], ["data.validation_fraction=0.1"])
    with pytest.raises(ConfigError, match="data.validation_fraction=1.0"):
        load_config("shapes", [], ["objective.name=online_dpo", "data.validation_fraction=1.0"])
