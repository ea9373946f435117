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


def test_plan_runs_cover_every_family_method_and_mode_dpo_first():
    runs = _module().plan_runs()
    families = {"sdxl", "sd3", "flux", "qwenimage", "sana", "pixart"}
    assert {(m, f, q) for m, f, _, q in runs} == {(m, f, q) for m in ("dpo", "grpo") for f in families
                                                   for q in ("none", "int8")}
    assert [m for m, *_ in runs] == ["dpo"] * 12 + ["grpo"] * 12  # a budget cut leaves the DPO rows


@pytest.mark.parametrize("method", ["dpo_step", "grpo_step"])
def test_realwidth_steps_train_only_the_adapter(method, tiny_dir):
    """realwidth_check's LoRA-DPO step and GRPO update, on a tiny FLUX: gradients reach the adapter only."""
    from peft import LoraConfig

    from visalign.models.plan import build_denoiser, published_config
    from visalign.models.plan_inputs import INPUTS

    config = published_config("flux", str(tiny_dir("flux")))
    model = build_denoiser(config, empty=False, dtype=torch.float32).train().requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    inputs = INPUTS[config["_class_name"]](config, 64, 2, 8, torch.float32)
    if method == "dpo_step":  # a zero adapter makes policy = reference: perturb it so the pair differs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    getattr(load_script("realwidth_check"), method)(model, inputs)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora" in n for n in grads)
    assert any(g.abs().sum() > 0 for g in grads.values())
