"""Every registered method takes one training step from the CLI, on its data kind, on every registered model
family: a method file or a family file that registers itself is covered here without editing this file
(the backbone side of the contract is test_family_contract)."""

import io
import json
import math

import numpy as np
import pytest
from helpers import Redness, family_variants, finetune_args, write_pairs  # noqa: F401  (Redness: test_redness)

from visalign.registry import METHODS

METHOD_NAMES = [n for n in METHODS.names() if METHODS.get(n).__module__.startswith("visalign.")]
FAMILIES = family_variants()
# small settings per data kind so that one step is cheap; anything a method needs beyond its defaults
ONLINE = ["objective.prompts_per_round=2", "objective.round_steps=1", "objective.steps=3"]
EXTRA = {
    "grpo": [*ONLINE, "objective.group_size=2", "objective.window=2", "objective.reward=test_redness"],
    "disco": [*ONLINE, "objective.group_size=2", "objective.window=2", "objective.reward=test_redness"],
    "online_dpo": [*ONLINE, "objective.samples_per_prompt=2", "objective.min_margin=0",
                   "objective.reward=test_redness"],
    "d3po": [*ONLINE, "objective.reward=test_redness", "objective.min_margin=0"],
    "ddo": ONLINE,
    "inpo": ["objective.steps=2"],
    "smpo": ["objective.steps=2"],
    "rankdpo": ["data.format=lists"],
}


def write_lists(path, n: int = 4, k: int = 3, size: int = 32):
    """A ranked-list dataset (prompt, images, scores): k random images per prompt with distinct scores."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)

    def png():
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    table = pa.table({"prompt": [f"a photo of {i + 1} red circles" for i in range(n)],
                      "images": [[png() for _ in range(k)] for _ in range(n)],
                      "scores": [[float(j) / k + 0.01 * i for j in range(k)] for i in range(n)]})
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_takes_a_step_on_every_family(tiny_dir, tmp_path, method, family):
    from visalign.cli import main

    kind = METHODS.get(method).data
    data = {"pairs": lambda: write_pairs(tmp_path / "p.parquet", n=4, labels=[1, 0, 1, 0], scores=True),
            "lists": lambda: write_lists(tmp_path / "l.parquet"), "prompts": lambda: "shapes:train"}[kind]()
    out = tmp_path / "run"
    argv = ["finetune", *finetune_args(family, tiny_dir(family)), f"data.path={data}", f"objective.name={method}",
            f"train.output_dir={out}", "train.steps=1", "train.batch_size=2", "train.save_every=0",
            "train.log_every=1", "train.threads=1", "train.tracker=none", "train.mixed_precision=no",
            "train.gradient_checkpointing=false", *EXTRA.get(method, [])]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
