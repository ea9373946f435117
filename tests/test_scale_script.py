"""scripts/scale_shapes_dpo.py: runs sized by a wall-clock budget, each scored against the base with the same seeds."""

import json
from collections import defaultdict

import pytest
from helpers import load_script


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scale_script_trains_within_budget_and_reports_the_paired_change(tmp_path):
    mod = load_script("scale_shapes_dpo")
    summary = mod.main(["--out", str(tmp_path), "--per-task", "2", "--budget-s", "0", "--threads", "1",
                        "--make-data", "tiny:3:2", "--run", "a=data.path={out}/data/tiny/pairs,train.batch_size=2"])
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    row = summary["runs"][0]
    assert row["steps"] == mod.CALIBRATION_STEPS  # a spent budget still trains the calibration's length
    assert row["pairs_seen"] == 2 * row["steps"]
    # the change, recomputed by hand from the per-image files: mean over tasks of the mean paired difference
    base = {(r["prompt_index"], r["k"]): r["correct"] for r in _jsonl(tmp_path / "base" / "results.jsonl")}
    by_task = defaultdict(list)
    for r in _jsonl(tmp_path / "a" / "eval" / "results.jsonl"):
        by_task[r["tag"]].append(float(r["correct"]) - float(base[(r["prompt_index"], r["k"])]))
    assert len(by_task) == 6 and all(len(v) == 2 for v in by_task.values())
    assert row["delta"] == pytest.approx(sum(sum(v) / 2 for v in by_task.values()) / 6)


def test_online_bench_measures_rollouts_and_updates(tiny_dir, capsys):
    mod = load_script("bench_online")
    rows = mod.main(["--base", str(tiny_dir("pixel")), "--methods", "grpo,online_dpo", "--threads", "1",
                     "--rollout-methods", "grpo", "--rollout-settings", "fp32,10 sampler steps"])
    assert [r["method"] for r in rows] == ["grpo", "online_dpo", "grpo", "grpo"]
    assert all(r["per_rollout_s"] > 0 and r["per_update_s"] > 0 and 0 < r["sampling_share"] < 1 for r in rows[:2])
    fp32, short = rows[2:]
    # rollouts per minute against the limit of the round's forwards alone: the sampler adds little to them
    assert short["setting"] == "10 sampler steps" and short["rollouts"] == fp32["rollouts"] == 64
    assert all(0.2 < r["per_min"] / r["limit_per_min"] < 1.5 for r in (fp32, short))
    assert short["limit_per_min"] > 1.5 * fp32["limit_per_min"]  # half the forwards per rollout
    out = capsys.readouterr().out
    assert "| grpo | 64 |" in out and "| grpo | 64 | 10 sampler steps |" in out
