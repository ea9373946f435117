"""scripts/online_shapes.py and online_table.py: a run scored against the base, and the table built from runs."""

import json
import math
from pathlib import Path

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


def test_a_full_fine_tune_is_scored_from_its_model_folder(tmp_path):
    """lora.enabled=false writes RUN/model, not RUN/lora: the tuned verdicts are the trained model's own."""
    shapes = load_script("online_shapes")
    result = shapes.main(["--out", str(tmp_path / "full"), "-c", "configs/shapes/grpo.yaml", "--per-task", "1",
                          *TINY_GRPO, "lora.enabled=false", "train.lr=0.05"])  # big steps: verdicts move
    run = tmp_path / "full" / "run"
    assert (run / "model" / "unet").is_dir() and not (run / "lora").exists()
    assert shapes.tuned_model(run, "assets/shapes-base") == (str(run / "model"), None)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (run / "model" / weights).read_bytes() != (Path("assets/shapes-base") / weights).read_bytes()
    direct = shapes.evaluate(str(run / "model"), None, 1, 4321, tmp_path / "direct.jsonl")
    tuned = _jsonl(tmp_path / "full" / "tuned.jsonl")
    assert [r["correct"] for r in tuned] == [r["correct"] for r in direct]
    assert result["trajectories_trained"] > 0


def test_online_table_refuses_runs_scored_differently(tmp_path):
    for name, seed in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps({"eval_seed": seed, "per_task": 2}))
    with pytest.raises(SystemExit, match="different"):
        load_script("online_table").main([str(tmp_path)])


def test_scaling_curve_scores_each_checkpoint_on_each_seed_set_and_pools_them(tmp_path):
    from visalign.cli import main as cli

    run = tmp_path / "run"
    over = [o for o in TINY_GRPO if not o.startswith(("train.steps", "train.save_every"))]
    assert cli(["finetune", "-c", "configs/shapes/grpo.yaml", "shapes", f"train.output_dir={run}",
                "train.steps=2", "train.save_every=1", "train.lr=0.05", *over]) == 0  # big steps: verdicts move
    scaling = load_script("online_scaling")
    with pytest.raises(SystemExit, match="step-0000003"):
        scaling.main([str(run), "--out", str(tmp_path / "curve"), "--steps", "3", "--per-task", "1"])
    points = scaling.main([str(run), "--out", str(tmp_path / "curve"), "--steps", "1", "2", "--seeds", "4321", "99",
                           "--per-task", "1"])
    assert [p["step"] for p in points] == [1, 2]
    assert [p["rollouts"] for p in points] == [8, 16]  # a round of 2 prompts x 4 rollouts per update
    for p in points:
        by_task = {}
        for seed in (4321, 99):
            base = {(r["prompt_index"], r["k"]): r for r in _jsonl(tmp_path / f"base-shapes-base-seed{seed}-n1.jsonl")}
            tuned = _jsonl(tmp_path / "curve" / f"tuned-step{p['step']}-seed{seed}.jsonl")
            assert len(tuned) == 6
            d = [float(r["correct"]) - float(base[(r["prompt_index"], r["k"])]["correct"]) for r in tuned]
            assert p["seeds"][str(seed)]["overall"]["delta"] == pytest.approx(sum(d) / 6)
            for r, x in zip(tuned, d):
                by_task.setdefault(r["tag"], []).append(x)
        # pooled: each task's two paired samples (one per seed set), GenEval's unweighted mean over tasks
        assert all(len(v) == 2 for v in by_task.values()) and len(by_task) == 6
        assert p["pooled"]["overall"]["delta"] == pytest.approx(sum(sum(v) / 2 for v in by_task.values()) / 6)
        se = math.sqrt(sum(paired_mean(v)[1] ** 2 for v in by_task.values())) / 6
        assert p["pooled"]["overall"]["se"] == pytest.approx(se)
    assert any(p["pooled"]["overall"]["delta"] != 0 for p in points)  # the check above is not 0 == 0
    assert (run / "checkpoints" / "step-0000001" / "lora").is_dir()
    # --table-only re-tabulates what is scored and samples nothing (seed 7 was never scored: no point)
    again = ["--out", str(tmp_path / "curve"), "--steps", "1", "2", "--per-task", "1", "--table-only", "--seeds"]
    assert json.dumps(scaling.main([str(run), *again, "4321", "99"])) == json.dumps(points)
    assert scaling.main([str(run), *again, "4321", "7"]) == []
    assert not list(tmp_path.rglob("*seed7*"))


def test_online_signal_reads_each_kept_pair_by_verdict_and_object_count():
    """Hand-built groups: one kept pair says right-over-wrong with fewer objects, one says more objects with
    both wrong, one group's margin is below the threshold and yields no pair."""
    signal = load_script("online_signal")

    def row(i, tag, reward, correct, objects):
        return {"prompt_index": i, "tag": tag, "reward": reward, "correct": correct, "objects": objects}

    rows = [row(0, "counting", 1.0, True, 3), row(0, "counting", 0.4, False, 4), row(0, "counting", 0.5, False, 2),
            row(1, "counting", 0.5, False, 4), row(1, "counting", 0.2, False, 2),
            row(2, "counting", 0.5, False, 4), row(2, "counting", 0.45, False, 2),
            row(3, "two_object", 1.0, True, 3), row(3, "two_object", 1.0, True, 2)]
    s = signal.signal(rows, min_margin=0.15)
    c = s["counting"]
    assert (c["prompts"], c["pairs"]) == (3, 2) and c["yield"] == pytest.approx(2 / 3)
    assert c["right_over_wrong"] == pytest.approx(0.5) and c["wrong_over_right"] == 0.0
    assert c["more_objects"] == pytest.approx(0.5) and c["fewer_objects"] == pytest.approx(0.5)
    assert c["base_accuracy"] == pytest.approx(1 / 7)
    assert s["two_object"]["pairs"] == 0 and s["position"]["prompts"] == 0
    assert "| counting | 0.143 | 0.67 (2/3) | 0.50 | 0.00 | 0.50 | 0.50 |" in signal.table(s)


def test_ablation_table_reads_each_recipe_folder_and_counts_miscounts(tmp_path):
    """One row per scored recipe folder: its lever, wall (with the partial-wall note of a resumed run), the
    paired cells and counting's over/under counts read from the verdicts."""
    abl = load_script("online_ablation")
    over = {"tag": "counting", "correct": False, "reasons": ["expected circle<3, found 3"]}
    under = {"tag": "counting", "correct": False, "reasons": ["expected circle>=2, found 1"]}
    right = {"tag": "counting", "correct": True, "reasons": []}
    lines = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)  # noqa: E731
    (tmp_path / "base-shapes-base-seed7-n3.jsonl").write_text(lines((over, under, right)))
    cell = {"change": 0.1, "se": 0.05}
    for name in ("online-r32", "online-10steps-2x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tuned.jsonl").write_text(lines((over, over, right)))
        (tmp_path / name / "result.json").write_text(json.dumps({
            "eval_seed": 7, "per_task": 3, "train_seconds": 600.0, "tasks": {t: cell for t in abl.TASKS},
            "overall": {"delta": 0.03, "se": 0.01}}))
    (tmp_path / "unscored").mkdir()  # no result.json: no row
    text = abl.main(["--out", str(tmp_path), "--table-only"])
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| online")]
    assert [r[0] for r in rows] == ["| online-10steps-2x", "| online-r32"]
    assert rows[1][1] == abl.RECIPES["online-r32"][0] and rows[1][2] == "10.0 min"
    assert rows[0][2] == f"10.0 min ({abl.PARTIAL_WALL['online-10steps-2x']})"
    assert rows[1][3:9] == ["+0.100 ± 0.050"] * 6
    assert rows[1][9] == "+0.030 ± 0.010 (+3.0)" and rows[1][10] == "1 / 1 → 2 / 0"
    assert "(seed, samples per task): [(7, 3)]" in text
