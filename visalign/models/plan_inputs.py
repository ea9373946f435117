"""Dummy denoiser inputs for the memory planner: one builder per diffusers class, shaped as the run's
family feeds it (latent channels and packing, text tokens, pooled and added conditioning)."""

from __future__ import annotations

import torch


def unet_inputs(config: dict, resolution: int, batch: int, tokens: int, dtype) -> dict:
    side = resolution // config["_vae_factor"]
    inputs = {"sample": torch.randn(batch, config["in_channels"], side, side, dtype=dtype),
              "timestep": torch.full((batch,), 500), "encoder_hidden_states":
              torch.randn(batch, tokens, config["cross_attention_dim"], dtype=dtype)}
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text and the six size numbers
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, dtype=dtype),
                                       "time_ids": torch.zeros(batch, 6, dtype=dtype)}
    return inputs


def sd3_inputs(config: dict, resolution: int, batch: int, tokens: int, dtype) -> dict:
    side = resolution // config["_vae_factor"]
    return {"hidden_states": torch.randn(batch, config["in_channels"], side, side, dtype=dtype),
            "encoder_hidden_states": torch.randn(batch, tokens, config["joint_attention_dim"], dtype=dtype),
            "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], dtype=dtype),
            "timestep": torch.full((batch,), 500.0)}


def flux_inputs(config: dict, resolution: int, batch: int, tokens: int, dtype) -> dict:
    side = resolution // config["_vae_factor"]  # 2x2-packed latent tokens
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    inputs = {"hidden_states": torch.randn(batch, side * side, config["in_channels"], dtype=dtype),
              "encoder_hidden_states": torch.randn(batch, tokens, config["joint_attention_dim"], dtype=dtype),
              "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], dtype=dtype),
              "timestep": torch.full((batch,), 0.5), "img_ids": img_ids.reshape(-1, 3),
              "txt_ids": torch.zeros(tokens, 3)}
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


def qwenimage_inputs(config: dict, resolution: int, batch: int, tokens: int, dtype) -> dict:
    side = resolution // config["_vae_factor"]
    return {"hidden_states": torch.randn(batch, side * side, config["in_channels"], dtype=dtype),
            "encoder_hidden_states": torch.randn(batch, tokens, config["joint_attention_dim"], dtype=dtype),
            "encoder_hidden_states_mask": torch.ones(batch, tokens, dtype=torch.long),
            "timestep": torch.full((batch,), 0.5), "img_shapes": [[(1, side, side)]] * batch}


def captioned_dit_inputs(config: dict, resolution: int, batch: int, tokens: int, dtype) -> dict:
    """Sana and PixArt: a latent image and the caption's hidden states (Gemma-2's, T5's) with their mask."""
    side = resolution // config["_vae_factor"]
    return {"hidden_states": torch.randn(batch, config["in_channels"], side, side, dtype=dtype),
            "encoder_hidden_states": torch.randn(batch, tokens, config["caption_channels"], dtype=dtype),
            "encoder_attention_mask": torch.ones(batch, tokens, dtype=dtype),
            "timestep": torch.full((batch,), 500)}


INPUTS = {"UNet2DConditionModel": unet_inputs, "SD3Transformer2DModel": sd3_inputs,
          "FluxTransformer2DModel": flux_inputs, "QwenImageTransformer2DModel": qwenimage_inputs,
          "SanaTransformer2DModel": captioned_dit_inputs, "PixArtTransformer2DModel": captioned_dit_inputs}
