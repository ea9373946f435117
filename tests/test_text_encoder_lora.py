"""A LoRA on the text encoder(s) beside the denoiser's: the reference is still 'adapters off' (both), the
conditioning carries grad to the encoder, the LoRA file holds both parts and reloads in diffusers, and a
killed run resumes exactly (the encoder's adapter is checkpointed too)."""

import json

import pytest
import torch
from helpers import finetune_args, run_pipeline, tiny_pipeline, write_pairs
from safetensors.torch import load_file

from visalign.models.lora import LoraSpec, add_lora, add_text_encoder_lora, load_lora, save_lora
from visalign.models.unet import SDBackbone, SDXLBackbone


def _randomise(modules):
    with torch.no_grad():
        for m in modules:
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)


@pytest.mark.parametrize("cls,family", [(SDBackbone, "sd15"), (SDXLBackbone, "sdxl")])
def test_reference_is_both_adapters_off_and_grad_reaches_the_encoder(tiny_dir, tmp_path, cls, family):
    bb, base = cls(str(tiny_dir(family))), cls(str(tiny_dir(family)))
    add_lora(bb, LoraSpec(rank=4, alpha=4.0))
    params = add_text_encoder_lora(bb, LoraSpec(rank=4, alpha=2.0, targets=("q_proj", "k_proj", "v_proj", "out_proj")))
    assert params and set(bb.text_encoders_for_lora()) == ({"text_encoder"} if family == "sd15"
                                                           else {"text_encoder", "text_encoder_2"})
    _randomise([bb.unwrapped(), *bb.text_encoders_for_lora().values()])
    prompts = ["a cat", "a red circle"]
    cond = bb.encode_for_training(prompts)
    x, t = torch.randn(2, *bb.sample_shape), torch.tensor([300, 600])
    plain = base.predict(x, t, base.encode_prompts(prompts)).detach()
    with torch.no_grad(), bb.reference():
        assert torch.equal(bb.predict(x, t, cond), plain)  # the reference's own (adapters-off) text
    out = bb.predict(x, t, cond)
    assert (out - plain).abs().max() > 1e-4
    out.pow(2).mean().backward()
    for enc in bb.text_encoders_for_lora().values():  # (SDXL reads the penultimate layer: not every adapter)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in enc.named_parameters() if "lora" in n)
    save_lora(bb, tmp_path / "lora")
    keys = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    load_lora(base, tmp_path / "lora")  # visalign's own reload (evaluation) takes the text part too
    with torch.no_grad():
        assert base.text_lora
        assert torch.allclose(base.predict(x, t, base.encode_prompts(prompts)), out.detach(), atol=1e-5)
    pipe = tiny_pipeline(tiny_dir(family))
    pipe.load_lora_weights(tmp_path / "lora")  # diffusers reads both parts, alpha included
    assert next(iter(pipe.text_encoder.peft_config.values())).lora_alpha == 2.0
    with torch.no_grad():
        ours = bb.sample(prompts[:1], steps=2, guidance=3.0, latents=torch.zeros(1, *bb.sample_shape)).images
    theirs = run_pipeline(pipe, prompts[:1], 32, num_inference_steps=2, guidance_scale=3.0,
                          latents=torch.zeros(1, *bb.sample_shape))
    assert torch.isfinite(theirs).all() and ours.shape == theirs.shape


def test_text_encoder_lora_is_refused_where_the_format_has_no_text_part(tiny_dir):
    from visalign.errors import UserError
    from visalign.models.sana import SanaBackbone

    bb = SanaBackbone(str(tiny_dir("sana")), max_sequence_length=8)
    with pytest.raises(UserError, match="sana family's LoRA files .* no text-encoder part"):
        add_text_encoder_lora(bb, LoraSpec())


def test_text_encoder_lora_trains_and_resumes_exactly(tiny_dir, tmp_path):
    from visalign.cli import main

    pairs = write_pairs(tmp_path / "pairs.parquet", n=8, labels=[1, 0, 1, 0, 1, 0, 1, 0])
    common = [*finetune_args("sd15", tiny_dir("sd15")), f"data.path={pairs}", "train.batch_size=2", "train.lr=1e-3",
              "train.threads=1", "train.tracker=none", "train.mixed_precision=no", "lora.text_encoder=true",
              "train.prompt_dropout=0.3"]
    assert main(["finetune", *common, f"train.output_dir={tmp_path / 'full'}", "train.steps=4",
                 "train.save_every=0"]) == 0
    assert main(["finetune", *common, f"train.output_dir={tmp_path / 'cut'}", "train.steps=4",
                 "train.save_every=2"]) == 0
    ckpt = tmp_path / "cut" / "checkpoints" / "step-0000002"
    assert (ckpt / "text_lora.safetensors").exists()
    # resumed from step 2 (into a new folder) it ends where the uninterrupted run ends, text encoder included
    cut = tmp_path / "resumed"
    assert main(["finetune", *common, f"train.output_dir={cut}", "train.steps=4", "train.save_every=0",
                 f"train.resume={ckpt}"]) == 0
    full = load_file(tmp_path / "full" / "lora" / "pytorch_lora_weights.safetensors")
    again = load_file(cut / "lora" / "pytorch_lora_weights.safetensors")
    te = [k for k in full if k.startswith("text_encoder.")]
    assert te and any(full[k].abs().sum() > 0 for k in te if "lora_B" in k or "up" in k)
    assert all(torch.equal(full[k], again[k]) for k in full)
    rows = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and all(r["step"] > 2 for r in rows)  # it did resume at step 2
