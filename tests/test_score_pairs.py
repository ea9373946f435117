"""`visalign score-pairs`: scores equal to scoring the images directly, relabelling, lists, and a kill mid-run."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch
from helpers import write_pairs

from visalign.cli import main
from visalign.data.pairs import decode_image
from visalign.data.score_pairs import relabel


def _rows(folder):
    return [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def _direct(value, prompt):
    import numpy as np

    from visalign.worlds.shapes.rater import RaterReward

    img = torch.from_numpy(np.asarray(decode_image(value), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return float(RaterReward()(img[None], [prompt])[0])


def test_scores_equal_scoring_the_images_directly_and_relabel(tmp_path, capsys):
    data = write_pairs(tmp_path / "p.parquet", n=6, labels=[1, 0, 1, 0, 1, 1])
    out = tmp_path / "scored"
    assert main(["score-pairs", "--data", str(data), "--reward", "rater", "--out", str(out), "--relabel",
                 "--tie-margin", "0.01", "--shard-size", "4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 6 and summary["shards"] == 2 and summary["scored"]["rater"] == 12
    rows, source = _rows(out), pq.read_table(data).to_pylist()
    assert len(rows) == 6
    for row, src in zip(rows, source):
        assert row["jpg_0"] == src["jpg_0"] and row["caption"] == src["caption"]
        assert row["score_0"] == pytest.approx(_direct(src["jpg_0"], src["caption"]), abs=1e-6)
        assert row["score_1"] == pytest.approx(_direct(src["jpg_1"], src["caption"]), abs=1e-6)
        assert row["label_0"] == relabel(row["score_0"], row["score_1"], 0.01)
    # the scored copy trains with score-driven options (weighting needs score columns)
    code = main(["finetune", "shapes", "model.path=assets/shapes-base", f"data.path={out}", "data.weighting=margin",
                 f"train.output_dir={tmp_path / 'run'}", "train.steps=1", "train.batch_size=2", "train.save_every=0",
                 "train.threads=1", "train.tracker=none"])
    assert code == 0


def test_relabel_by_hand():
    assert relabel(0.7, 0.2, 0.1) == 1.0 and relabel(0.2, 0.7, 0.1) == 0.0 and relabel(0.5, 0.45, 0.1) == 0.5


def test_lists_are_rescored_and_reranked(tmp_path, tiny_dir, capsys):
    from visalign.data.make_dataset import MakeDatasetConfig, make_dataset

    lists = tmp_path / "lists"
    make_dataset(MakeDatasetConfig(prompts="shapes:train", models=[f"pixel={tiny_dir('pixel')}"], images_per_prompt=3,
                                   out=str(lists), steps=2, max_prompts=3, shard_size=4, threads=1), progress=False)
    out = tmp_path / "rescored"
    assert main(["score-pairs", "--data", str(lists), "--format", "lists", "--reward", "rater", "--out", str(out)]) == 0
    for row in _rows(out):
        direct = [_direct(v, row["prompt"]) for v in row["images"]]
        assert row["scores"] == pytest.approx(direct, abs=1e-6)
        assert sorted(range(3), key=lambda i: row["ranks"][i]) == sorted(range(3), key=lambda i: -direct[i])


def test_other_settings_are_refused_and_missing_data_is_one_line(tmp_path, capsys):
    data = write_pairs(tmp_path / "p.parquet", n=2)
    out = tmp_path / "o"
    assert main(["score-pairs", "--data", str(data), "--reward", "rater", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["score-pairs", "--data", str(data), "--reward", "shapes", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "rewards" in err and "Traceback" not in err
    assert main(["score-pairs", "--reward", "rater", "--out", str(out)]) == 2
    assert "--data" in capsys.readouterr().err


def test_a_killed_run_resumes_and_scores_every_image_once(tmp_path):
    data = write_pairs(tmp_path / "p.parquet", n=12)
    out = tmp_path / "scored"
    cmd = [sys.executable, "-m", "visalign", "score-pairs", "--data", str(data), "--reward", "rater",
           "--out", str(out), "--shard-size", "1", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while len(list(out.glob("pairs-*.parquet"))) < 2:
        assert proc.poll() is None and time.time() < deadline, "finished or stalled before the kill"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("pairs-*.parquet")))
    assert done_before < 12
    with sqlite3.connect(out / ".reward_cache.sqlite") as db:
        cached_before = db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["written"] == 12 - done_before
    assert summary["scored"]["rater"] == 24 - cached_before  # nothing scored twice
    rows = _rows(out)
    assert len(rows) == 12 and [r["caption"] for r in rows] == [r["caption"] for r in pq.read_table(data).to_pylist()]
