"""make-dataset: schema, provenance, pairs view, sharding across processes, and kill-safe resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from visalign.data.make_dataset import MakeDatasetConfig, make_dataset, pairs_from_list, ranks_from_scores
from visalign.data.pairs import decode_image
from visalign.rewards.base import ensemble_scores, normalise


def _cfg(model, out, **kw):
    base = dict(prompts="shapes:eval", models=[f"pixel={model}"], images_per_prompt=3, rewards=["shapes"],
                out=str(out), steps=2, guidance=2.0, seed=0, batch_size=8, shard_size=4, max_prompts=10,
                pairs="best-worst", threads=1)
    return MakeDatasetConfig(**(base | kw))


def _rows(out: Path, kind="data"):
    files = sorted(out.glob(f"{kind}-*.parquet")) if kind == "data" else sorted((out / "pairs").glob("*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def test_schema_provenance_and_pairs(tiny_dir, tmp_path):
    import datasets

    out = tmp_path / "ds"
    summary = make_dataset(_cfg(tiny_dir("pixel"), out), progress=False)
    assert summary["prompts"] == 10 and summary["shards"] == 3 and summary["images"] == 30
    ds = datasets.load_dataset("parquet", data_files=str(out / "data-*.parquet"), split="train")
    assert len(ds) == 10
    assert {"prompt", "images", "scores", "reward_scores", "ranks", "sources", "seeds"} <= set(ds.column_names)
    row = ds[0]
    assert len(row["images"]) == 3 and decode_image(row["images"][0]).size == (16, 16)
    assert sorted(row["ranks"]) == [0, 1, 2] and len(row["reward_scores"]["shapes"]) == 3
    assert len(set(ds["prompt"])) == 10
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["steps"] == 2 and prov["rewards"][0]["name"] == "shapes" and prov["normalise"] == "zscore"
    pairs = datasets.load_dataset("parquet", data_files=str(out / "pairs" / "*.parquet"), split="train")
    assert set(pairs.column_names) >= {"caption", "jpg_0", "jpg_1", "label_0", "score_0", "score_1"}
    for p in pairs:
        assert p["label_0"] == 1.0 and p["score_0"] > p["score_1"]


def test_progress_bar_counts_the_short_last_shard(tiny_dir, tmp_path, capsys):
    make_dataset(_cfg(tiny_dir("pixel"), tmp_path / "ds"), progress=True)  # shards of 4, 4 and 2 prompts
    err = capsys.readouterr().err
    assert "30/30" in err and "/36" not in err


def test_same_seeds_same_images_and_sharding_over_ranks(tiny_dir, tmp_path):
    one = tmp_path / "one"
    make_dataset(_cfg(tiny_dir("pixel"), one), progress=False)
    two = tmp_path / "two"
    make_dataset(_cfg(tiny_dir("pixel"), two), rank=1, world=2, progress=False)
    assert [p.name for p in sorted(two.glob("data-*.parquet"))] == ["data-00001.parquet"]
    make_dataset(_cfg(tiny_dir("pixel"), two), rank=0, world=2, progress=False)
    a, b = _rows(one), _rows(two)
    assert [r["prompt"] for r in a] == [r["prompt"] for r in b]
    assert all(x["images"] == y["images"] and x["seeds"] == y["seeds"] for x, y in zip(a, b))


def _launch(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "visalign", "make-dataset", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_then_rerun_gives_exactly_one_row_per_prompt(tiny_dir, tmp_path):
    out = tmp_path / "killed"
    args = ["--prompts", "shapes:eval", "--model", f"pixel={tiny_dir('pixel')}", "--images-per-prompt", "2",
            "--reward", "shapes", "--out", str(out), "--steps", "2", "--shard-size", "2", "--max-prompts", "12",
            "--batch-size", "2", "--threads", "1", "--pairs", "best-worst"]
    proc = _launch(args)
    deadline = time.time() + 120
    while len(list(out.glob("data-*.parquet"))) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("data-*.parquet")))
    assert done_before < 6
    again = _launch(args)
    assert again.wait(300) == 0, again.stdout.read()
    rows = _rows(out)
    prompts = [r["prompt_index"] for r in rows]
    assert sorted(prompts) == list(range(12))
    for f in out.glob("*.parquet"):
        pq.read_table(f)  # no corrupt shard
    assert not list(out.glob(".*tmp*")) or all(p.stat().st_size >= 0 for p in out.glob(".*tmp*"))
    ref = tmp_path / "ref"
    assert _launch(args[:args.index("--out") + 1] + [str(ref)] + args[args.index("--out") + 2:]).wait(300) == 0
    assert [r["images"] for r in _rows(ref)] == [r["images"] for r in sorted(rows, key=lambda r: r["prompt_index"])]


def test_normalisation_and_ensemble_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0, 3.0]])
    z = normalise(s, "zscore")
    mu, sd = 2.25, (sum((x - 2.25) ** 2 for x in [1, 2, 3, 3]) / 4) ** 0.5
    assert torch.allclose(z, (s - mu) / sd)
    assert torch.allclose(normalise(s, "rank"), torch.tensor([[0.0, 1 / 3, 2.5 / 3, 2.5 / 3]]))
    flat = normalise(torch.tensor([[5.0, 5.0]]), "zscore")
    assert flat.tolist() == [[0.0, 0.0]]
    agg = ensemble_scores({"a": torch.tensor([[0.0, 1.0]]), "b": torch.tensor([[10.0, 0.0]])}, {"a": 3.0, "b": 1.0})
    assert torch.allclose(agg, torch.tensor([[(3 * -1 + 1 * 1) / 4, (3 * 1 + 1 * -1) / 4]]))
    with pytest.raises(ValueError, match="normalisation 'minmax'"):
        normalise(s, "minmax")


def test_ranks_and_pairs_views():
    assert ranks_from_scores([0.2, 0.9, 0.5]) == [2, 0, 1]
    row = {"prompt": "p", "images": [b"a", b"b", b"c"], "scores": [0.2, 0.9, 0.5]}
    bw = pairs_from_list(row, "best-worst")
    assert len(bw) == 1 and bw[0]["jpg_0"] == b"b" and bw[0]["jpg_1"] == b"a" and bw[0]["margin"] == pytest.approx(0.7)
    assert len(pairs_from_list(row, "all")) == 3
    assert pairs_from_list({"prompt": "p", "images": [b"a", b"b"], "scores": [1.0, 1.0]}, "best-worst") == []


def test_min_margin_and_renderer_model(tiny_dir, tmp_path):
    row = {"prompt": "p", "images": [b"a", b"b", b"c"], "scores": [1.0, 0.95, 0.5]}
    assert [(p["jpg_0"], p["jpg_1"]) for p in pairs_from_list(row, "all", 0.15)] == [(b"a", b"c"), (b"b", b"c")]
    assert pairs_from_list({"prompt": "p", "images": [b"a", b"b"], "scores": [1.0, 0.95]}, "best-worst", 0.15) == []
    out = tmp_path / "mixed"
    make_dataset(_cfg(tiny_dir("pixel"), out, models=["shapes-render", f"pixel={tiny_dir('pixel')}"],
                      images_per_prompt=2, normalise="none", pairs="all", min_margin=0.15, max_prompts=4),
                 progress=False)
    rows = _rows(out)
    assert all(len(r["images"]) == 4 and r["sources"][0].startswith("shapes-render#") for r in rows)
    # one image size per row: the renderer follows the model's 16x16
    assert all(decode_image(im).size == (16, 16) for r in rows for im in r["images"])


def test_two_cpu_processes_with_accelerate_launch(tiny_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes: each writes its shards, together one dataset, no duplicates."""
    out = tmp_path / "ddp"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = str(Path(sys.executable).parent / "accelerate")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", "29733", "-m", "visalign", "make-dataset",
           "--prompts", "shapes:eval", "--model", f"pixel={tiny_dir('pixel')}", "--images-per-prompt", "2",
           "--out", str(out), "--steps", "2", "--shard-size", "2", "--max-prompts", "8", "--threads", "1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count('"written": 2') == 2  # 4 shards split over 2 processes
    rows = _rows(out)
    assert sorted(row["prompt_index"] for row in rows) == list(range(8))
