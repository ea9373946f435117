"""A quantized frozen base (model.quantize, issue #37): the backends each mode takes, LoRA steps on every mode
the CPU serves, the reference as the quantized base with adapters off, and the trained LoRA loading onto the
unquantized base in diffusers and in the kohya export."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_pipeline, tiny_pipeline, write_pairs
from safetensors.torch import load_file

from visalign.cli import main
from visalign.errors import UserError
from visalign.models import quantize
from visalign.models.lora import LoraSpec, add_lora, save_lora
from visalign.models.unet import SDBackbone

CPU_MODES = ["int8", "fp8"]


def test_each_mode_takes_the_backend_that_serves_it(monkeypatch):
    assert quantize.backend_for("none", cuda=False) == ""
    assert quantize.backend_for("int8", cuda=False) == "quanto"
    assert quantize.backend_for("fp8", cuda=True) == "quanto"
    with pytest.raises(UserError, match="needs a CUDA GPU.*int8 or fp8"):
        quantize.backend_for("nf4", cuda=False)
    with pytest.raises(UserError, match="model.quantize='int4': expected one of none, int8, nf4, fp8"):
        quantize.backend_for("int4", cuda=False)
    monkeypatch.setattr(quantize, "_installed", lambda module: module == "bitsandbytes")
    assert quantize.backend_for("int8", cuda=True) == "bitsandbytes"
    assert quantize.backend_for("nf4", cuda=True) == "bitsandbytes"
    with pytest.raises(UserError, match=r"needs optimum-quanto.*pip install 'visalign\[quant\]'"):
        quantize.backend_for("int8", cuda=False)
    monkeypatch.setattr(quantize, "_installed", lambda module: False)
    with pytest.raises(UserError, match="nf4 needs bitsandbytes"):
        quantize.backend_for("nf4", cuda=True)


def _quantized_layers(model) -> int:
    return sum(type(m).__name__.startswith("Q") for m in model.modules())


@pytest.mark.parametrize("mode", CPU_MODES)
def test_every_cpu_mode_trains_lora_steps_from_the_cli(mode, tiny_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "p.parquet", n=6)
    out = tmp_path / "run"
    assert main(["finetune", "shapes", f"model.path={tiny_dir('pixel')}", f"model.quantize={mode}",
                 f"data.path={data}", f"train.output_dir={out}", "train.steps=3", "train.batch_size=2",
                 "train.lr=1e-3", "train.save_every=0", "train.log_every=1", "train.threads=1",
                 "train.tracker=none"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert lora and all(v.dtype == torch.float32 for v in lora.values())  # adapters in the compute dtype


@pytest.mark.parametrize("mode", CPU_MODES)
def test_reference_is_the_quantized_base_adapters_off_and_only_the_adapter_moves(mode, tiny_dir):
    torch.manual_seed(0)
    bb = SDBackbone(str(tiny_dir("sd15")), quantize=mode)
    base = SDBackbone(str(tiny_dir("sd15")), quantize=mode)  # the same quantized weights, no adapter
    assert _quantized_layers(bb.unwrapped()) > 0 and quantize.is_quantized(bb.unwrapped())
    add_lora(bb, LoraSpec(rank=4, alpha=4.0))
    trainable = [p for p in bb.unwrapped().parameters() if p.requires_grad]
    names = [n for n, p in bb.unwrapped().named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    x, t = torch.randn(2, *bb.sample_shape), torch.tensor([200, 800])
    cond = bb.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        plain = base.predict(x, t, cond)
        with bb.reference():
            assert torch.equal(bb.predict(x, t, cond), plain)
    opt = torch.optim.SGD(trainable, lr=1.0)
    for _ in range(2):
        opt.zero_grad()
        bb.predict(x, t, cond).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        with bb.reference():
            assert torch.equal(bb.predict(x, t, cond), plain)  # the frozen quantized base did not move
        assert (bb.predict(x, t, cond) - plain).abs().max() > 1e-5  # the adapter did


def test_a_lora_trained_on_a_quantized_base_loads_onto_the_unquantized_one(tiny_dir, tmp_path, capsys):
    torch.manual_seed(0)
    bb = SDBackbone(str(tiny_dir("sd15")), quantize="int8")
    add_lora(bb, LoraSpec(rank=4, alpha=4.0))
    with torch.no_grad():
        for n, p in bb.unwrapped().named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    save_lora(bb, tmp_path / "lora")
    pipe = tiny_pipeline(tiny_dir("sd15"))  # full precision: no quantization config anywhere
    assert _quantized_layers(pipe.unet) == 0
    before = run_pipeline(pipe, "a cat", 32, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    pipe.load_lora_weights(tmp_path / "lora")
    after = run_pipeline(pipe, "a cat", 32, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert (after - before).abs().max() > 1e-4
    assert main(["export-lora", str(tmp_path / "lora"), "--out", str(tmp_path / "kohya.safetensors")]) == 0
    kohya = load_file(tmp_path / "kohya.safetensors")
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)


def test_a_quantized_base_trains_adapters_only():
    from visalign.config import load_config
    from visalign.registry import ConfigError

    with pytest.raises(ConfigError, match="model.quantize=int8: a quantized base is frozen"):
        load_config("shapes", [], ["model.quantize=int8", "lora.enabled=false"])
    assert load_config("shapes", [], ["model.quantize=fp8"]).model.kwargs["quantize"] == "fp8"
