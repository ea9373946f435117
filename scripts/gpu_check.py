"""GPU check (one command, <= 8 minutes): real-size SDXL UNet and SD3-medium transformer, random init.

    bash scripts/gpu_check.sh            # writes gpu_check.json

LoRA Diffusion-DPO steps in bf16 with gradient checkpointing: step time and peak memory, with PyTorch
SDPA and (when it loads) xformers. SDXL at 1024x1024 (latents 128x128); SD3-medium at 1024 (latents 128).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch


def _bench(model, make_inputs, steps: int = 6) -> dict:
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            x, kw, target = make_inputs()
            err = ((model(x, **kw).sample.float() - target) ** 2).flatten(1).mean(1)  # policy on [w; l]
            with torch.no_grad():
                model.disable_adapters()
                ref = ((model(x, **kw).sample.float() - target) ** 2).flatten(1).mean(1)
                model.enable_adapters()
            w, l_ = err.chunk(2)
            rw, rl = ref.chunk(2)
            loss = -torch.nn.functional.logsigmoid(-2500 * ((w - rw) - (l_ - rl))).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def sdxl(attention: str) -> dict:
    from diffusers import UNet2DConditionModel

    cfg = dict(  # the SDXL base UNet's architecture (2.6 B parameters)
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    unet = UNet2DConditionModel(**cfg).cuda()
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    b = 2

    def inputs():
        x = torch.randn(2 * b, 4, 128, 128, device="cuda")
        kw = {"timestep": torch.randint(0, 1000, (2 * b,), device="cuda"),
              "encoder_hidden_states": torch.randn(2 * b, 77, 2048, device="cuda"),
              "added_cond_kwargs": {"text_embeds": torch.randn(2 * b, 1280, device="cuda"),
                                    "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * 2 * b, device="cuda")}}
        return x, kw, torch.randn_like(x)

    return _bench(unet, inputs) | {"pairs": b, "params_m": sum(p.numel() for p in unet.parameters()) / 1e6}


def sd3(attention: str) -> dict:
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                                  dual_attention_layers=tuple(range(13)), qk_norm="rms_norm").cuda()
    if attention == "xformers":
        model.enable_xformers_memory_efficient_attention()
    b = 2

    def inputs():
        x = torch.randn(2 * b, 16, 128, 128, device="cuda")
        kw = {"timestep": torch.rand(2 * b, device="cuda") * 1000,
              "encoder_hidden_states": torch.randn(2 * b, 333, 4096, device="cuda"),
              "pooled_projections": torch.randn(2 * b, 2048, device="cuda")}
        return x, kw, torch.randn_like(x)

    return _bench(model, inputs) | {"pairs": b, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU")
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, fn in (("sdxl_1024", sdxl), ("sd3_medium_1024", sd3)):
        for attention in ("sdpa", "xformers"):
            try:
                results[f"{name}/{attention}"] = fn(attention)
            except Exception as e:  # xformers may not load for this torch build
                results[f"{name}/{attention}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            torch.cuda.empty_cache()
            print(name, attention, results[f"{name}/{attention}"], flush=True)
    with open("gpu_check.json", "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
