"""Evaluation: GenEval-style metrics on a hand-written metadata file, ShapesWorld FID behaviour."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from visalign.cli import main
from visalign.eval.geneval import summarise

ROOT = Path(__file__).resolve().parents[1]

HAND_WRITTEN = [
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
    {"tag": "counting", "include": [{"class": "square", "count": 2}], "exclude": [{"class": "square", "count": 3}],
     "prompt": "a photo of two squares"},
    {"tag": "colors", "include": [{"class": "triangle", "count": 1, "color": "red"}],
     "prompt": "a photo of a red triangle"},
    {"tag": "position", "include": [{"class": "square", "count": 1},
                                    {"class": "circle", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a circle left of a square"},
]


def test_summary_by_hand():
    per = [{"tag": "a", "correct": True}, {"tag": "a", "correct": False}, {"tag": "b", "correct": True},
           {"tag": "b", "correct": True}, {"tag": "b", "correct": True}, {"tag": "b", "correct": False}]
    m = summarise(per)
    assert m["tasks"]["a"] == {"accuracy": 0.5, "se": math.sqrt(0.25 / 2), "n": 2}
    assert m["tasks"]["b"]["accuracy"] == 0.75 and m["tasks"]["b"]["se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert m["overall"] == pytest.approx(0.625)
    assert m["overall_se"] == pytest.approx(math.sqrt(0.125 + 0.75 * 0.25 / 4) / 2)


def test_eval_geneval_on_hand_written_metadata(tiny_dir, tmp_path, capsys):
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("\n".join(json.dumps(r) for r in HAND_WRITTEN) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "geneval", "--model", str(tiny_dir("pixel")), "--metadata", str(meta),
                 "--samples-per-prompt", "3", "--seed", "7", "--steps", "2", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["tasks"]) == {"single_object", "counting", "colors", "position"}
    assert all(t["n"] == 3 for t in m["tasks"].values()) and m["n"] == 12
    assert m["overall"] == pytest.approx(sum(t["accuracy"] for t in m["tasks"].values()) / 4)
    assert m["seed"] == 7 and m["detector"] == "shapes-exact" and (out / "grid.png").exists()
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {r["prompt"] for r in rows} == {r["prompt"] for r in HAND_WRITTEN}
    # same seed, same numbers
    out2 = tmp_path / "out2"
    main(["eval", "geneval", "--model", str(tiny_dir("pixel")), "--metadata", str(meta), "--samples-per-prompt",
          "3", "--seed", "7", "--steps", "2", "--out", str(out2)])
    assert json.loads((out2 / "metrics.json").read_text())["overall"] == m["overall"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"tag": "single_object", "include": [{"class": "dog", "count": 1}],
                               "prompt": "a photo of a dog"}) + "\n")
    assert main(["eval", "geneval", "--model", str(tiny_dir("pixel")), "--metadata", str(bad), "--out",
                 str(tmp_path)]) == 2
    assert "'dog' is not a ShapesWorld shape" in capsys.readouterr().err


def _renders(n, seed, desaturate=0.0):
    from visalign.worlds.shapes.render import render, sample_records

    imgs = []
    for i, r in enumerate(sample_records(n, seed)):
        img = render(r, seed * 7 + i)[0].astype(np.float32)
        img = (1 - desaturate) * img + desaturate * img.mean(-1, keepdims=True)  # a progressive colour shift
        imgs.append(img.astype(np.uint8))
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def test_shapes_fid_near_zero_for_renders_and_monotone_under_shift():
    from visalign.eval.fid import fid

    real = _renders(600, 1)
    same = fid(real, _renders(600, 2))
    shifted = [fid(real, _renders(600, 2, s)) for s in (0.2, 0.4, 0.6, 0.8)]
    assert same < 0.05 * shifted[-1]  # finite-sample bias only: small against any real shift
    assert all(a < b for a, b in zip([same] + shifted, shifted)), (same, shifted)


def test_inception_fid_needs_a_local_file(tmp_path):
    from visalign.eval.fid import make_fid

    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        make_fid("inception", str(tmp_path / "missing.pth"))


def test_shipped_feature_net_reports_its_accuracy():
    cfg = json.loads((ROOT / "assets" / "shapes-features" / "config.json").read_text())
    assert cfg["held_out_count_accuracy"] > 0.9 and cfg["held_out_color_accuracy"] > 0.95


def test_open_vocab_geneval_plumbing_with_tiny_configs(tiny_dir, tmp_path, tiny_owl):
    from visalign.eval.open_vocab import GENEVAL_COLORS, OpenVocabDetector

    owl = tiny_owl
    det = OpenVocabDetector(str(owl), "visalign-tiny-clip", "", threshold=0.0, counting_threshold=0.0)
    objs = det.detect(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)), ["circle", "square"])
    assert len(objs) == 16 and {o.shape for o in objs} <= {"circle", "square"}  # one box per patch, best class
    assert all(o.color in GENEVAL_COLORS and 0 <= o.box[0] < o.box[2] <= 32 for o in objs)
    meta = tmp_path / "m.jsonl"
    meta.write_text("\n".join(json.dumps(r) for r in HAND_WRITTEN[:2]) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "geneval", "--model", str(tiny_dir("pixel")), "--metadata", str(meta), "--detector",
                 "owlv2", "--owl", str(owl), "--clip-arch", "visalign-tiny-clip", "--clip-pretrained", "",
                 "--samples-per-prompt", "2", "--steps", "2", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 4 and m["detector"].startswith("owlv2:")


def test_geneval_prompt_set_on_a_tiny_sd_model_with_calibrated_thresholds(tiny_dir, tmp_path, tiny_owl, capsys):
    from visalign.eval.grid import save_png, to_pil

    labels = tmp_path / "labels.jsonl"
    rows = []
    for i in range(4):
        img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i))
        save_png(to_pil(img), tmp_path / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "class": ["dog", "cat"][i % 2], "count": i % 3})
    labels.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    fit_file = tmp_path / "thresholds.json"
    assert main(["eval", "calibrate-detector", "--labels", str(labels), "--owl", str(tiny_owl),
                 "--out", str(fit_file)]) == 0
    fit = json.loads(fit_file.read_text())
    assert fit["n"] == 4 and 0 <= fit["threshold"] <= 1 and "geneval_defaults" in fit
    out = tmp_path / "out"
    assert main(["eval", "geneval", "--model", str(tiny_dir("sd15")), "--metadata", "geneval", "--per-task", "1",
                 "--detector", "owlv2", "--owl", str(tiny_owl), "--clip-arch", "visalign-tiny-clip",
                 "--clip-pretrained", "", "--thresholds", str(fit_file), "--samples-per-prompt", "1", "--steps", "2",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 6 and set(m["tasks"]) == {"single_object", "two_object", "counting", "colors", "position",
                                               "color_attr"}


def test_threshold_fit_recovers_known_thresholds():
    import random

    from visalign.eval.calibrate import fit_thresholds

    rng = random.Random(0)
    true_presence, true_count = 0.42, 0.77
    scores, counts, counting = [], [], []
    for _ in range(300):  # presence rows: weak real objects just above τ, spurious boxes just below it
        n = rng.choice([0, 1])
        scores.append([rng.uniform(true_presence, 0.6) for _ in range(n)]
                      + [rng.uniform(0.0, true_presence) for _ in range(rng.randint(0, 3))])
        counts.append(n)
        counting.append(False)
    for _ in range(300):  # counting rows: real objects above τ_c, duplicate boxes between the thresholds
        n = rng.choice([2, 3, 4])
        scores.append([rng.uniform(true_count, 1.0) for _ in range(n)]
                      + [rng.uniform(true_presence, true_count) for _ in range(rng.randint(0, 2))])
        counts.append(n)
        counting.append(True)
    fit = fit_thresholds(scores, counts, counting)
    assert fit["counting_accuracy"] == 1.0 and fit["presence_accuracy"] == 1.0
    assert abs(fit["counting_threshold"] - true_count) < 0.01
    assert abs(fit["threshold"] - true_presence) < 0.01
    assert fit_thresholds([[0.5], [0.1]], [1, 0])["threshold"] == pytest.approx(0.3)  # midway between the two


def test_eval_fid_and_winrate_commands(tiny_dir, tmp_path):
    model = str(tiny_dir("pixel"))
    assert main(["eval", "fid", "--model", model, "--real", "shapes:eval", "--n", "40", "--steps", "2",
                 "--out", str(tmp_path / "fid")]) == 0
    r = json.loads((tmp_path / "fid" / "fid.json").read_text())
    assert r["fid"] > 0 and r["feature"] == "shapes" and r["n_real"] == 40 and "resize" in r
    assert main(["eval", "winrate", "--model", model, "--baseline", model, "--reward", "shapes", "--prompts",
                 "shapes:eval", "--samples-per-prompt", "1", "--steps", "2", "--out", str(tmp_path / "wr")]) == 0
    w = json.loads((tmp_path / "wr" / "winrate.json").read_text())
    # a model against itself with the same seeds: every comparison is a tie
    assert w["win_rate"] == 0.5 and w["ties"] == w["n"] == 90


def test_paired_statistics_against_the_statistics_module():
    import statistics

    from visalign.eval.stats import paired_by_task, paired_mean

    d = [0.0, 1.0, 1.0, -1.0, 0.0, 1.0]
    mean, se = paired_mean(d)
    assert mean == pytest.approx(statistics.mean(d)) and se == pytest.approx(statistics.stdev(d) / len(d) ** 0.5)
    base = [{"prompt_index": i, "k": 0, "tag": t, "correct": c} for i, (t, c) in
            enumerate([("a", 0), ("a", 1), ("a", 0), ("b", 1), ("b", 1)])]
    tuned = [{"prompt_index": i, "k": 0, "tag": t, "correct": c} for i, (t, c) in
             enumerate([("a", 1), ("a", 1), ("a", 0), ("b", 0), ("b", 1)])]
    out = paired_by_task(base, tuned)
    assert out["tasks"]["a"]["change"] == pytest.approx(1 / 3) and out["tasks"]["b"]["change"] == pytest.approx(-0.5)
    assert out["tasks"]["a"]["base"] == pytest.approx(1 / 3) and out["tasks"]["b"]["tuned"] == pytest.approx(0.5)
    se_a, se_b = statistics.stdev([1, 0, 0]) / 3 ** 0.5, statistics.stdev([-1, 0]) / 2 ** 0.5
    assert out["overall"]["delta"] == pytest.approx((1 / 3 - 0.5) / 2)
    assert out["overall"]["se"] == pytest.approx((se_a ** 2 + se_b ** 2) ** 0.5 / 2)


def test_eval_commands_read_one_typed_config_from_files_flags_and_key_values(tiny_dir, tmp_path, capsys):
    """`eval winrate -c FILE` (the shipped protocol file) <- flags <- key=value, with the same strict checks."""
    import yaml

    from visalign.config import load_section
    from visalign.eval.configs import WinrateConfig

    protocol = str(Path(__file__).resolve().parents[1] / "configs/eval/winrate.yaml")
    shipped = yaml.safe_load(open(protocol))
    model = str(tiny_dir("pixel"))
    cfg = load_section(WinrateConfig, [protocol], {"seed": 7, "steps": None},
                       ["steps=3", "out=x"], "eval winrate")
    assert (cfg.reward, cfg.seed, cfg.steps, cfg.samples_per_prompt) == ("rater", 7, 3, shipped["samples_per_prompt"])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a red circle\na photo of two squares\n")
    out = tmp_path / "wr"
    assert main(["eval", "winrate", "-c", protocol, f"model={model}", f"baseline={model}",
                 "--reward", "shapes", f"prompts={prompts}", "steps=2", "--out", str(out)]) == 0
    w = json.loads((out / "winrate.json").read_text())
    assert (w["reward"], w["steps"], w["seed"], w["n"]) == ("shapes", 2, shipped["seed"], 2)
    capsys.readouterr()
    for argv, expected in (
            (["eval", "winrate", "-c", protocol, "sample_per_prompt=2"],
             "unknown key eval winrate.sample_per_prompt; valid keys: .*did you mean 'samples_per_prompt'"),
            (["eval", "winrate", "-c", protocol], "eval winrate: pass --out"),
            (["eval", "geneval", "--out", str(tmp_path / "g")], "eval geneval: pass --model"),
            (["eval", "fid", "--model", model, "--real", "shapes:eval", "--out", "o", "n=0"],
             r"eval fid.n=0: expected a positive")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(expected, err), (argv, err)
