"""LoRA variants through peft: DoRA and per-module ranks train from the CLI, and reload in plain diffusers."""

import pytest
import torch
from helpers import finetune_args, run_pipeline, tiny_pipeline, write_pairs
from safetensors.torch import load_file

from visalign.models.lora import LoraSpec, add_lora, load_lora, save_lora
from visalign.models.unet import SDBackbone


def test_dora_adds_magnitudes_keeps_the_reference_and_reloads(tiny_dir, tmp_path):
    bb, base = SDBackbone(str(tiny_dir("sd15"))), SDBackbone(str(tiny_dir("sd15")))
    add_lora(bb, LoraSpec(rank=4, alpha=4.0, use_dora=True))
    names = [n for n, p in bb.unwrapped().named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)
    with torch.no_grad():
        for n, p in bb.unwrapped().named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    x, t = torch.randn(2, *bb.sample_shape), torch.tensor([200, 800])
    cond = bb.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        tuned, plain = bb.predict(x, t, cond), base.predict(x, t, cond)
        with bb.reference():
            assert torch.equal(bb.predict(x, t, cond), plain)
    assert (tuned - plain).abs().max() > 1e-4
    save_lora(bb, tmp_path / "lora")
    assert any("magnitude" in k for k in load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    load_lora(base, tmp_path / "lora")
    with torch.no_grad():
        assert torch.allclose(base.predict(x, t, cond), tuned, atol=1e-5)
    pipe = tiny_pipeline(tiny_dir("sd15"))
    before = run_pipeline(pipe, "a cat", 32, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    pipe.load_lora_weights(tmp_path / "lora")
    after = run_pipeline(pipe, "a cat", 32, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert (after - before).abs().max() > 1e-4


@pytest.mark.parametrize("extra", [["lora.use_dora=true"], ["lora.rank_pattern={to_q: 2, to_v: 6}"]],
                         ids=["dora", "rank_pattern"])
def test_variants_train_from_the_cli(tiny_dir, tmp_path, extra):
    from visalign.cli import main

    pairs = write_pairs(tmp_path / "pairs.parquet", n=4, labels=[1, 0, 1, 0])
    out = tmp_path / "run"
    assert main(["finetune", *finetune_args("sd15", tiny_dir("sd15")), f"data.path={pairs}", f"train.output_dir={out}",
                 "train.steps=2", "train.batch_size=2", "train.save_every=0", "train.threads=1",
                 "train.tracker=none", "train.mixed_precision=no", *extra]) == 0
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    if "dora" in extra[0]:
        assert any("magnitude" in k for k in lora)
    else:
        ranks = {k.split(".")[-4]: v.shape[0] for k, v in lora.items() if k.endswith("lora.down.weight")
                 or k.endswith("lora_A.weight")}
        assert ranks.get("to_q") == 2 and ranks.get("to_v") == 6 and ranks.get("to_k") == 8
