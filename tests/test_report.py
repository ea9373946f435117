"""`visalign report`: plots, grids, metric tables; rendered in headless Chromium, not blank, numbers present."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from helpers import write_pairs
from PIL import Image

from visalign.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = write_pairs(root / "p.parquet", n=6, labels=[1, 0, 1, 0, 1, 0])
    out = root / "run"
    assert main(["finetune", "shapes", f"model.path={tiny_dir('pixel')}", f"data.path={data}",
                 f"train.output_dir={out}", "train.steps=6", "train.batch_size=2", "train.log_every=1",
                 "train.threads=1", "train.tracker=none", "train.gold_reward=shapes", "train.gold_every=3",
                 "train.gold_samples=4", "train.sample_steps=2", "train.save_every=0"]) == 0
    metrics = {"tasks": {"counting": {"accuracy": 0.4375, "se": 0.124, "n": 16},
                         "colors": {"accuracy": 0.8125, "se": 0.0976, "n": 16}},
               "overall": 0.625, "overall_se": 0.0789, "n": 32}
    (out / "eval" / "tuned").mkdir(parents=True)
    (out / "eval" / "tuned" / "metrics.json").write_text(json.dumps(metrics))
    return out


def test_report_files_and_contents(run_dir):
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    for name in ("curve_loss.png", "curve_implicit_acc.png", "curve_logit_mean.png", "curve_errors.png",
                 "curve_gold.png", "before_after.png"):
        assert (run_dir / "report" / name).exists()
    assert page.count("data:image/png;base64,") >= 6 and "src=\"report/" not in page  # self-contained
    assert "0.625 ± 0.079" in page and "0.44 ± 0.12" in page
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"{last['loss']:.4g}" in page
    assert "diffusion_dpo" in page


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is installed by .ci/run (apt-get install chromium)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    main(["report", str(run_dir), "--no-grid"])
    url = (run_dir / "report.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run(common + [f"--screenshot={shot}", "--window-size=1200,1600", url], check=True, timeout=120,
                   capture_output=True)
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert img.std() > 10 and (img < 128).mean() > 0.01  # text and plots, not a blank page
    dom = subprocess.run(common + ["--dump-dom", url], check=True, timeout=120, capture_output=True, text=True).stdout
    assert "visalign report" in dom and "0.625 ± 0.079" in dom and "Training curves" in dom


def test_report_escapes_every_field_read_from_the_run(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    mark = "<script>alert(1)</script>"
    summary = json.loads((run / "summary.json").read_text())
    summary.update(steps=mark, pairs_seen=mark, seconds=mark)
    (run / "summary.json").write_text(json.dumps(summary))
    winrate = {"reward": mark, "win_rate": mark, "ci_low": 0.4, "ci_high": mark, "n": mark,
               "terms": {mark: {"baseline": mark, "model": 0.5, "change": mark, "se": 0.01}}}
    (run / mark.replace("/", "_")).mkdir()
    (run / mark.replace("/", "_") / "winrate.json").write_text(json.dumps(winrate))
    (run / "diagnose.json").write_text(json.dumps({"concentration": mark, "baseline": {"name": mark,
                                                                                       "concentration": 0.2}}))
    Image.new("RGB", (4, 4)).save(run / "diagnose.png")
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 99, mark: 1.0}) + "\n")
    assert main(["report", str(run), "--baseline", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "<script" not in page and "&lt;script&gt;" in page
