"""Qwen-Image: QwenImageTransformer2DModel (MMDiT) on packed latents of a 3D causal VAE, Qwen2.5-VL text.

The flow conventions are SD3's (``FlowBackbone``); what differs, as ``QwenImagePipeline`` runs it:

- the text: the prompt inside the pipeline's chat template, Qwen2.5-VL's last hidden states of the valid
  tokens with the template's first 34 tokens dropped, padded (mask 0) to ``max_sequence_length``: padding
  to one length keeps cached and batched conditioning stackable; the transformer masks it, so the velocity
  equals the pipeline's batch-longest padding;
- latents [C, H, W] are packed into 2x2 patches around each forward (as FLUX's), with the image's shape as
  ``img_shapes``; the VAE works on one-frame videos and normalises latents per channel
  (``latents_mean`` / ``latents_std``);
- the grid is FLUX's (σ = linspace(1, 1/N, N), shifted by the resolution's μ);
- guidance is "true CFG" on the negative prompt " ", with the guided velocity rescaled to the conditional
  one's norm per token (the pipeline's rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..registry import register_preset
from .backbone import Cond, register_family
from .flow import FlowBackbone
from .flux import pack, packed_grid_scheduler, packed_shifts, unpack
from .load import load_diffusers, load_transformers
from .quantize import quantization_kwargs

# the pipeline's chat template and how many of its tokens precede the prompt (QwenImagePipeline's own)
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
TEMPLATE_TOKENS = 34

register_preset("qwenimage", {"model": {"name": "qwenimage", "path": "Qwen/Qwen-Image"},
                              "objective": {"name": "diffusion_dpo", "beta": 100.0},
                              "train": {"lr": 1e-5, "mixed_precision": "bf16", "gradient_checkpointing": True,
                                        "guidance": 4.0, "sample_steps": 50}})


# guidance: QwenImagePipeline's true_cfg_scale; its LoRA writer is the pipeline (transformer.* keys)
@register_family("qwenimage", pipeline="QwenImagePipeline", guidance=4.0, tiny=("qwenimage",),
                 tiny_kwargs={"resolution": 32, "max_sequence_length": 16})
class QwenImageBackbone(FlowBackbone):
    """Qwen-Image: rectified flow on packed 3D-VAE latents with Qwen2.5-VL text and norm-rescaled CFG."""

    def __init__(self, path: str, resolution: int = 1024, logit_mean: float = 0.0, logit_std: float = 1.0,
                 max_sequence_length: int = 512, negative_prompt: str = " ", revision: str | None = None,
                 load_encoders: bool = True,
                 quantize: str = "none"):
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        kw = {"revision": revision} if revision else {}
        self.denoiser = load_diffusers(QwenImageTransformer2DModel, path, "transformer", what="transformer",
                                      **kw, **quantization_kwargs(quantize))
        self.vae = self.text_encoder = self.tokenizer = None
        if load_encoders:
            self.vae = load_diffusers(AutoencoderKLQwenImage, path, "vae", what="VAE", **kw).eval()
            self.vae.requires_grad_(False)
            self.text_encoder = load_transformers(Qwen2_5_VLForConditionalGeneration, path, "text_encoder",
                                                  what="Qwen2.5-VL text encoder", **kw).eval().requires_grad_(False)
            self.tokenizer = load_transformers(AutoTokenizer, path, "tokenizer", what="tokenizer")
        self.scheduler_config = dict(load_diffusers(FlowMatchEulerDiscreteScheduler, path, "scheduler",
                                                    what="scheduler").config)
        vae_cfg = self.vae.config if self.vae is not None else AutoencoderKLQwenImage.load_config(path, subfolder="vae")
        factor = 2 ** len(vae_cfg["temperal_downsample"])
        if resolution % (2 * factor):
            raise ValueError(f"model.resolution={resolution}: Qwen-Image needs a multiple of {2 * factor}")
        side = resolution // factor
        self.resolution, self.path, self.sample_shape = resolution, path, (int(vae_cfg["z_dim"]), side, side)
        self.latents_mean = torch.tensor(vae_cfg["latents_mean"]).view(1, -1, 1, 1)
        self.latents_std = torch.tensor(vae_cfg["latents_std"]).view(1, -1, 1, 1)
        self.num_train_timesteps = int(self.scheduler_config["num_train_timesteps"])
        self.mu, self.shift = packed_shifts(self.scheduler_config, (side // 2) ** 2)
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.max_sequence_length, self.negative_prompt = max_sequence_length, negative_prompt

    def encode_prompts(self, prompts: Sequence[str], image_meta: dict | None = None) -> Cond:
        tok = self.tokenizer([TEMPLATE.format(p) for p in prompts], max_length=1024 + TEMPLATE_TOKENS,
                             padding=True, truncation=True, return_tensors="pt").to(self.text_encoder.device)
        hidden = self.text_encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                                   output_hidden_states=True).hidden_states[-1]
        n = self.max_sequence_length
        out = hidden.new_zeros(len(prompts), n, hidden.shape[-1])
        mask = torch.zeros(len(prompts), n, dtype=torch.long, device=hidden.device)
        for i, valid in enumerate(tok.attention_mask.bool()):
            kept = hidden[i][valid][TEMPLATE_TOKENS:][:n]  # the prompt's tokens after the template's system part
            out[i, : len(kept)], mask[i, : len(kept)] = kept, 1
        return Cond({"hidden": out, "mask": mask})

    def unconditional(self, n: int, guidance: float, image_meta: dict | None = None) -> Cond | None:
        return None if guidance == 1.0 else self.encode_prompts([self.negative_prompt] * n)

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        model, x_in, t, cond = self.denoiser_inputs(x_t, t, cond)
        b, _, h, w = x_in.shape
        out = model(hidden_states=pack(x_in), timestep=(t.float() / self.num_train_timesteps).to(x_in.dtype),
                    encoder_hidden_states=cond.tensors["hidden"], encoder_hidden_states_mask=cond.tensors["mask"],
                    img_shapes=[[(1, h // 2, w // 2)]] * b).sample
        return unpack(out, h, w).to(x_t.dtype)

    def guided(self, x: Tensor, t: Tensor, cond: Cond, uncond: Cond | None, guidance: float) -> Tensor:
        """True CFG u + w(c − u), rescaled per packed token to the conditional velocity's norm."""
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if uncond is None or guidance == 1.0:
            return self.predict(x, t, cond)
        u, c = self.predict(torch.cat([x, x]), torch.cat([t, t]), Cond.cat([uncond, cond])).chunk(2)
        combined, c_tokens = pack(u + guidance * (c - u)), pack(c)
        scale = c_tokens.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
        return unpack(combined * scale, x.shape[-2], x.shape[-1])

    def sampling_scheduler(self, steps: int):
        return packed_grid_scheduler(self.scheduler_config, steps, self.device, self.mu)

    # a one-frame video VAE with per-channel latent normalisation
    def latent_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        dist = self.vae.encode((images.to(self.vae.device, self.vae.dtype) * 2 - 1)[:, :, None]).latent_dist
        mean, std = self.latents_mean.to(images.device), self.latents_std.to(images.device)
        return (dist.mean[:, :, 0].float() - mean) / std, dist.std[:, :, 0].float() / std

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean, std = self.latent_moments(images)
        return mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)

    def decode(self, x0: Tensor) -> Tensor:
        z = x0 * self.latents_std.to(x0.device) + self.latents_mean.to(x0.device)
        out = self.vae.decode(z.to(self.vae.dtype)[:, :, None]).sample[:, :, 0]
        return ((out.float() + 1) / 2).clamp(0, 1)

    @staticmethod
    def build_tiny(variant: str, out) -> None:
        """A toy Qwen-Image folder: one MMDiT block, a 2-level 3D VAE, a 1-layer Qwen2.5-VL and a word
        tokenizer whose chat template tokenises to the pipeline's 34 leading tokens."""
        from diffusers import (
            AutoencoderKLQwenImage,
            FlowMatchEulerDiscreteScheduler,
            QwenImagePipeline,
            QwenImageTransformer2DModel,
        )
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        tok = chat_tokenizer()
        text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                    rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.pad_token_id, eos_token_id=tok.pad_token_id)
        encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=text, vision_config=dict(depth=1, hidden_size=16, out_hidden_size=16, num_heads=2,
                                                 intermediate_size=32), **text))
        transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                                  attention_head_dim=8, num_attention_heads=2,
                                                  joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                     temperal_downsample=[False], latents_mean=[0.1, -0.2, 0.05, 0.0],
                                     latents_std=[1.5, 0.8, 1.2, 1.0])
        sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=8192, base_shift=0.5, max_shift=0.9,
                                                time_shift_type="exponential")
        QwenImagePipeline(scheduler=sched, vae=vae, text_encoder=encoder, tokenizer=tok,
                          transformer=transformer).save_pretrained(out, safe_serialization=True)


def chat_tokenizer():
    """A word-level tokenizer with Qwen's chat special tokens in which newlines and punctuation are tokens, so
    the template's system part is 34 tokens, as Qwen's own BPE makes it (no weights or vocab downloaded)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .tiny import EXTRA_WORDS, world_words

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    spaced = TEMPLATE.replace("{}", " ")
    for mark in ("<|im_start|>", "<|im_end|>", "\n", ",", ":"):
        spaced = spaced.replace(mark, f" {mark} ")
    words = [*spaced.split(" "), *world_words(), *EXTRA_WORDS]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in words:
        if w and w not in vocab:
            vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"), pre_tokenizers.Split(Regex(r" +"), "removed"),
        pre_tokenizers.Punctuation("isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"], padding_side="right")
