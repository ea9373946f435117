"""scripts/gpu_check.py's code path on a CPU at tiny size: the same LoRA-DPO step it times on a GPU."""

import json
import math

import pytest
import torch
from helpers import load_script


def _module():
    return load_script("gpu_check")


def test_gpu_check_runs_its_code_path_on_cpu_at_tiny_size(tmp_path):
    out = tmp_path / "check.json"
    results = _module().main(["--device", "cpu", "--size", "tiny", "--steps", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == results
    for model in ("sdxl_tiny", "sd3_medium_tiny", "flux_dev_tiny"):
        row = results[f"{model}/sdpa"]
        assert "error" not in row and row["step_s"] > 0
        # the adapter starts as the identity, so policy = reference (adapters off) and the first DPO loss is log 2
        assert row["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
        assert all(math.isfinite(v) for v in row["losses"])
        assert 0 < row["trainable_m"] < 0.5 * row["params_m"]  # only the LoRA adapter trains
        assert "error" in results[f"{model}/xformers"]  # xformers has no CPU path: recorded, not fatal
    assert results["flux_dev_tiny/sdpa"]["grpo_update_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_gpu_check_without_a_gpu_says_what_to_do():
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--device cpu --size tiny"):
        _module().main([])
