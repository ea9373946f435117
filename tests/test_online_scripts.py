"""scripts/online_shapes.py and online_table.py: a run scored against the base, and the table built from runs."""

import json

import pytest
from helpers import load_script

from visalign.eval.stats import paired_mean

TINY_GRPO = ["train.steps=1", "objective.prompts_per_round=2", "objective.group_size=4", "objective.round_steps=1",
             "objective.reward=shapes",  # continuous: a 2-prompt round is never all ties
             "objective.steps=2", "objective.window=1", "train.batch_size=8", "train.tracker=none",
             "train.save_every=0", "train.threads=1"]


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_online_run_is_paired_against_a_shared_base_and_tabulated(tmp_path):
    shapes = load_script("online_shapes")
    result = shapes.main(["--out", str(tmp_path / "grpo"), "-c", "configs/shapes/grpo.yaml", "--per-task", "2",
                          *TINY_GRPO])
    base_file = tmp_path / "base-shapes-base-seed4321-n2.jsonl"
    assert base_file.exists() and not (tmp_path / "grpo" / "base.jsonl").exists()
    base = {(r["prompt_index"], r["k"]): r for r in _jsonl(base_file)}
    tuned = _jsonl(tmp_path / "grpo" / "tuned.jsonl")
    pos = [float(r["correct"]) - float(base[(r["prompt_index"], r["k"])]["correct"])
           for r in tuned if r["tag"] == "position"]
    assert result["tasks"]["position"]["change"] == pytest.approx(paired_mean(pos)[0])

    (tmp_path / "copy").mkdir()  # a second run: the table lists both, sorted by name
    (tmp_path / "copy" / "result.json").write_text((tmp_path / "grpo" / "result.json").read_text())
    table = load_script("online_table").main([str(tmp_path)])
    rows = [line for line in table.splitlines() if line.startswith("| copy") or line.startswith("| grpo")]
    assert [r.split(" | ")[0] for r in rows] == ["| copy", "| grpo"]
    o = result["overall"]
    assert f"{o['delta']:+.3f} ± {o['se']:.3f}" in rows[1]
    assert "seed 4321, 2 paired samples per task" in table


def test_online_table_refuses_runs_scored_differently(tmp_path):
    for name, seed in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps({"eval_seed": seed, "per_task": 2}))
    with pytest.raises(SystemExit, match="different"):
        load_script("online_table").main([str(tmp_path)])
