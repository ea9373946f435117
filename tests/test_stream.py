"""Streaming a hub-layout dataset: training reads and caches only the rows it reaches, and resumes exactly."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from helpers import write_pairs
from safetensors.torch import load_file

from visalign.config import load_config
from visalign.train.loop import train


@pytest.fixture
def hub_folder(tmp_path):
    """A local copy in the hub's own layout: README.md + data/train-*.parquet (two files, 40 rows)."""
    root = tmp_path / "hub"
    (root / "data").mkdir(parents=True)
    for i in range(2):
        write_pairs(root / "data" / f"train-0000{i}-of-00002.parquet", n=20, seed=i, labels=[1, 0, 1, 0.5] * 5)
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: data/train-*\n---\n")
    return root


def _cfg(model, data, out, cache, extra=()):
    return load_config("shapes", [], [f"model.path={model}", f"data.path={data}", f"train.output_dir={out}",
                                      "data.streaming=true", "data.stream_chunk_rows=4", f"data.cache_dir={cache}",
                                      "train.batch_size=2", "train.threads=1", "train.tracker=none",
                                      "train.mixed_precision=no", "train.lr=1e-3", *extra])


def test_streamed_hub_dataset_trains_and_caches_only_the_rows_seen(tiny_dir, hub_folder, tmp_path):
    cache = tmp_path / "cache"
    summary = train(_cfg(tiny_dir("pixel"), hub_folder, tmp_path / "run", cache, ["train.steps=3",
                                                                                  "train.save_every=0"]))
    assert summary["steps"] == 3
    chunks = sorted(cache.rglob("chunk-*.json"))
    rows = sum(json.loads(f.read_text())["rows"] for f in chunks)
    assert rows == 8  # 3 steps x 2 rows = 6 usable rows seen: two chunks of 4; the other 24 usable rows unread
    first = json.loads(chunks[0].read_text())
    source = pq.read_table(hub_folder / "data" / "train-00000-of-00002.parquet").to_pylist()
    usable = [r["caption"] for r in source if r["label_0"] != 0.5]
    assert first["prompts"] == usable[:4]  # stream order, ties dropped
    assert first["raw_end"] == 5  # the fourth usable row is the fifth raw row (one tie skipped)


def test_streamed_run_resumes_exactly(tiny_dir, hub_folder, tmp_path):
    extra = ["train.steps=6", "train.save_every=3"]
    run = tmp_path / "run"
    train(_cfg(tiny_dir("pixel"), hub_folder, run, tmp_path / "c1", extra))
    full = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    (run / "lora" / "pytorch_lora_weights.safetensors").unlink()
    shutil.rmtree(tmp_path / "c1")  # even from an empty cache: the stream is reopened where step 3 left it
    ckpt = run / "checkpoints" / "step-0000003"
    train(_cfg(tiny_dir("pixel"), hub_folder, run, tmp_path / "c1", [*extra, f"train.resume={ckpt}"]))
    resumed = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-6, rtol=0), k


def test_streaming_refuses_margin_ordering(tiny_dir, hub_folder, tmp_path):
    from visalign.registry import ConfigError

    with pytest.raises(ConfigError, match="streaming"):
        _cfg(tiny_dir("pixel"), hub_folder, tmp_path / "r", tmp_path / "c", ["data.curriculum=true"])
