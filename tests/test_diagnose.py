"""`visalign diagnose`: per-block weight deltas against a hand calculation, and a trained adapter vs a random one."""

import json
import math

import pytest
import torch
from helpers import write_pairs
from safetensors.torch import load_file

from visalign.cli import main
from visalign.eval.diagnose import block_of, concentration, profile_distance


def test_concentration_and_profile_distance_by_hand():
    assert concentration([1.0, 1.0, 1.0, 1.0]) == pytest.approx(0.0)
    assert concentration([0.0, 5.0, 0.0, 0.0]) == pytest.approx(1.0)
    p = [0.5, 0.25, 0.25]
    assert concentration([2.0, 1.0, 1.0]) == pytest.approx(1 + sum(x * math.log(x) for x in p) / math.log(3))
    a = {"blocks": [{"block": "x", "k": 1.0}, {"block": "y", "k": 3.0}]}
    b = {"blocks": [{"block": "x", "k": 2.0}, {"block": "y", "k": 2.0}]}
    assert profile_distance(a, b, "k") == pytest.approx(0.25)
    assert profile_distance(a, a, "k") == 0.0


@pytest.fixture(scope="module")
def lora_run(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    data = write_pairs(root / "p.parquet", n=8, labels=[1] * 8)
    run = root / "run"
    assert main(["finetune", "shapes", f"model.path={tiny_dir('pixel')}", f"data.path={data}",
                 f"train.output_dir={run}", "train.steps=6", "train.batch_size=4", "train.lr=3e-2",
                 "train.save_every=0", "train.threads=1", "train.tracker=none", "train.mixed_precision=no"]) == 0
    return run


def test_weight_delta_per_block_matches_the_lora_factors(lora_run, capsys):
    assert main(["diagnose", str(lora_run), "--n-prompts", "4", "--baseline", "random"]) == 0
    out = capsys.readouterr().out
    assert "concentration" in out and (lora_run / "diagnose.png").exists()
    result = json.loads((lora_run / "diagnose.json").read_text())
    # independent: ΔW = (alpha/r)·B·A from the saved diffusers-format LoRA file, summed per block
    lora = load_file(lora_run / "lora" / "pytorch_lora_weights.safetensors")
    cfg_alpha, rank = 8.0, 8  # the shapes preset's LoRA (lora.alpha, lora.rank)
    sq: dict[str, float] = {}
    for key, a in lora.items():
        if ".lora.down." not in key:  # diffusers' format: lora.down = A, lora.up = B
            continue
        b = lora[key.replace(".lora.down.", ".lora.up.")]
        delta = (cfg_alpha / rank) * b.float().flatten(1) @ a.float().flatten(1)
        name = key.split(".", 1)[1]  # drop the 'unet.' prefix
        parts = name.split(".")
        block = f"{parts[0]}.{parts[1]}" if parts[1].isdigit() else parts[0]
        sq[block] = sq.get(block, 0.0) + float((delta ** 2).sum())
    got = {r["block"]: r["delta_norm"] for r in result["blocks"] if "delta_norm" in r}
    assert set(got) == set(sq)
    for block, value in sq.items():
        assert got[block] == pytest.approx(math.sqrt(value), rel=1e-4), block
    # the random control has the same total norm but another shape
    base = result["baseline"]
    assert base["total_delta_norm"] == pytest.approx(result["total_delta_norm"], rel=1e-4)
    assert base["distance_delta_norm"] > 0.02 or base["distance_shift_added"] > 0.02
    trained_top1 = sum(r["top1_share"] for r in result["blocks"] if "top1_share" in r)
    random_top1 = sum(r["top1_share"] for r in base["blocks"] if "top1_share" in r)
    assert trained_top1 > random_top1  # a trained update is closer to low rank than a random rank-r one
    shifts = [r for r in result["blocks"] if "activation_shift" in r]
    first = next(i for i, r in enumerate(shifts) if "delta_norm" in r)
    assert all(r["activation_shift"] == 0 for r in shifts[:first])  # nothing changes before the first adapter
    assert all(r["activation_shift"] > 0 for r in shifts[first:])


def test_block_names():
    from visalign.models.tiny import build_tiny  # noqa: F401  (the tiny UNet's layout)

    class Root(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down_blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
            self.mid_block = torch.nn.Linear(2, 2)

    root = Root()
    assert block_of("down_blocks.0.attentions.1.to_q.weight", root) == "down_blocks.0"
    assert block_of("mid_block.resnets.0.conv1.weight", root) == "mid_block"
    assert block_of("conv_in.weight", root) == "conv_in"


def test_diagnose_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
