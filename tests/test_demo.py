"""The demo's plumbing on a tiny model (the real run is `make demo`), and the paired improvement statistic."""

import json
import math

import pytest

from visalign.demo import paired_improvement, run_demo


def test_paired_improvement_by_hand():
    base = [{"prompt_index": i, "k": 0, "tag": t, "correct": c}
            for i, (t, c) in enumerate([("a", 0), ("a", 1), ("a", 0), ("b", 0), ("b", 1)])]
    tuned = [dict(r, correct=c) for r, c in zip(base, [1, 1, 1, 1, 1])]
    imp = paired_improvement(base, tuned)
    da, db = [1, 0, 1], [1, 0]
    se_a = math.sqrt(sum((d - 2 / 3) ** 2 for d in da) / 2 / 3)
    se_b = math.sqrt(sum((d - 0.5) ** 2 for d in db) / 1 / 2)
    assert imp["delta"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert imp["se"] == pytest.approx(math.sqrt(se_a**2 + se_b**2) / 2)


def test_quick_demo_runs_end_to_end(tiny_dir, tmp_path, capsys):
    report = run_demo(tmp_path / "demo", quick=True, base=str(tiny_dir("pixel")))
    out = capsys.readouterr().out
    assert "| model | overall |" in out and "GenEval-shapes change:" in out and "rater win rate" in out
    assert set(report["metrics"]) == {"base", "dpo-lora"}
    assert set(report["rater"]["terms"]) == {"prompt", "size", "margin", "crisp", "centre"}
    assert report["rater"]["n"] == 12 and 0 <= report["rater"]["win_rate"] <= 1
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert saved["train"]["steps"] == 3 and (tmp_path / "demo" / "eval" / "base" / "grid.png").exists()
    page = (tmp_path / "demo" / "run" / "report.html").read_text()
    assert f"report: {tmp_path / 'demo' / 'run' / 'report.html'}" in out and "rater win rate" in page
    provenance = json.loads((tmp_path / "demo" / "data" / "provenance.json").read_text())
    assert provenance["rewards"][0]["name"] == "rater"
    run_demo(tmp_path / "demo", quick=True, base=str(tiny_dir("pixel")))  # a rerun starts its run over


def test_the_demo_samples_data_training_grids_and_evaluation_at_one_guidance(tiny_dir, tmp_path, monkeypatch):
    import visalign.demo as demo

    seen = []
    real = demo.heldout_results
    monkeypatch.setattr(demo, "heldout_results", lambda *a, **kw: seen.append(kw["guidance"]) or real(*a, **kw))
    run_demo(tmp_path / "demo", quick=True, base=str(tiny_dir("pixel")), guidance=2.25)
    provenance = json.loads((tmp_path / "demo" / "data" / "provenance.json").read_text())
    assert provenance["guidance"] == 2.25
    assert "guidance: 2.25" in (tmp_path / "demo" / "run" / "config.yaml").read_text()
    assert seen == [2.25, 2.25]  # base and tuned


def test_demo_cli_names_a_missing_base(tmp_path, capsys):
    from visalign.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), "--base", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no ShapesWorld base model at" in err and "nowhere" in err


def test_native_bf16_follows_the_cpu_flags(monkeypatch):
    from pathlib import Path

    from visalign.models.load import native_bf16

    real = Path.read_text
    for flags, expected in (("fpu avx2 fma", False), ("avx512f amx_bf16 amx_tile", True), ("avx512_bf16", True)):
        monkeypatch.setattr(Path, "read_text", lambda self, *a, _f=flags, **k: (
            f"flags\t\t: {_f}\n" if str(self) == "/proc/cpuinfo" else real(self, *a, **k)))
        assert native_bf16("cpu") is expected
    assert native_bf16("meta") is False
