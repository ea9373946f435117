"""The ShapesWorld base model: a small pixel-space text-to-image diffusers UNet, pretrained on renders."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import UserError, require_positive
from ...model_folders import PARAMETERISATION_FILE, SAMPLING_FILE
from ...models.diffusion import denoising_target
from ...models.kdiff import LearnedK, k_target, velocity_error
from ...models.pixel import save_pixel_folder as save_pipeline_folder
from .contrast import near_miss
from .render import draw, sample_records, scene_for
from .vocab import caption_words


@dataclass
class PretrainConfig:
    """Pretraining of the ShapesWorld base (DDPM, v or ε prediction, classifier-free caption dropout)."""

    seed: int = 0
    size: int = 32  # image side in pixels
    steps: int = 2400
    batch_size: int = 64
    lr: float = 1e-3
    final_lr_fraction: float = 0.3  # cosine decay ends at lr * this
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    bf16: bool = True  # bf16 autocast on CPU (AMX/AVX-512-BF16) or GPU
    threads: int = 0  # torch threads; 0 keeps torch's default
    save_every: int = 200
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    text_hidden: int = 64
    text_layers: int = 2
    max_tokens: int = 16
    caption_noise: float = 0.0  # share of images drawn as a near miss of their caption (noisy alt-text)
    init_from: str = ""  # a ShapesWorld model folder to continue from (its weights; a fresh optimizer)
    save_raw: bool = False  # also write the raw (non-EMA) weights to OUT-raw, to compare the two
    step_offset: int = 0  # continue the data stream here (init_from's steps_done), so no batch repeats
    # v rather than ε: an ε loss barely weighs an image's mean colour at high noise, so ε bases drew tinted
    # backgrounds and off-palette objects; v with trailing timesteps (sampling starts at t = T−1) fixes both
    # k: k-Diff's generalised target y_k (models/kdiff.py; 0 = ε, 1 = v, 2 = x), trained in v-space, with k fixed
    # or learned with the network (learn_k, from k); the folder declares it in visalign_parameterisation.json
    prediction_type: str = "v_prediction"  # epsilon | v_prediction | k
    timestep_spacing: str = "trailing"
    k: float = 1.0
    learn_k: bool = False
    k_lr: float = 0.0  # a learned k's learning rate on its logit (0: the network's), on the same schedule

    def check(self, where: str = "pretrain") -> None:
        for key in ("size", "steps", "batch_size", "lr", "text_hidden", "text_layers", "max_tokens"):
            require_positive(getattr(self, key), f"{where}.{key}")
        for key in ("warmup_steps", "save_every", "threads", "step_offset", "caption_dropout", "caption_noise",
                    "final_lr_fraction"):
            require_positive(getattr(self, key), f"{where}.{key}", allow_zero=True)
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"{where}.ema_decay={self.ema_decay!r}: expected a number in [0, 1)")
        if self.prediction_type not in ("epsilon", "v_prediction", "k"):
            raise UserError(f"{where}.prediction_type={self.prediction_type!r}: expected epsilon, v_prediction or k")
        require_positive(self.k_lr, f"{where}.k_lr", allow_zero=True)
        if not 0 <= self.k <= 2:
            raise UserError(f"{where}.k={self.k!r}: expected a number in [0, 2] (0 = ε, 1 = v, 2 = x)")


def build_components(cfg: PretrainConfig):
    """Fresh (unet, text_encoder, tokenizer, scheduler) with ShapesWorld's architecture and vocabulary."""
    from ...models.pixel import build_pixel_components

    return build_pixel_components(cfg.size, tuple(cfg.block_out_channels), cfg.text_hidden, cfg.text_layers,
                                  cfg.max_tokens, caption_words(),
                                  "v_prediction" if cfg.prediction_type == "k" else cfg.prediction_type,
                                  cfg.timestep_spacing)


def render_batch(step: int, cfg: PretrainConfig) -> tuple[torch.Tensor, list[str]]:
    """Batch ``step`` of the pretraining stream: images in [-1, 1] and captions, fixed by (seed, step)."""
    records = sample_records(cfg.batch_size, seed=cfg.seed * 1_000_003 + step)
    base = (cfg.seed * 1_000_003 + step) * cfg.batch_size
    images = np.stack([_render_for_caption(r, base + i, cfg) for i, r in enumerate(records)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, [r["prompt"] for r in records]


def _render_for_caption(record: dict, seed: int, cfg: PretrainConfig) -> np.ndarray:
    """The render of ``record`` from ``seed`` (as ``render``); with probability ``caption_noise`` a near miss
    of it instead (one attribute wrong, as web alt-text often is)."""
    rng = random.Random(seed)
    objects = scene_for(record, rng, cfg.size)
    if cfg.caption_noise and rng.random() < cfg.caption_noise:
        objects = near_miss(record, objects, rng, size=cfg.size) or objects
    return draw(objects, cfg.size)


def sampling_declaration(prediction_type: str) -> dict:
    """The guidance a base of this recipe samples best at, as measured on the shipped bases (README)."""
    if prediction_type == "k":
        return {"guidance": 1.5, "note": "a k-Diff base: the v-prediction base's best guidance, not tuned for k"}
    if prediction_type == "v_prediction":
        return {"guidance": 1.5, "note": "best classifier-free guidance of the shipped v-prediction base on the demo's "
                "300 held-out samples (GenEval-shapes overall 0.553 at 1, 0.603 at 1.5, 0.523 at 2, 0.397 at 3): "
                "stronger guidance oversaturates colours off the palette (docs/experiments.md, seventh round)"}
    return {"guidance": 3.0, "note": "the first, epsilon base's best on the demo's held-out set (0.460)"}


def _load_weights(unet, text_encoder, folder: Path) -> None:
    """Copy a saved ShapesWorld model's weights (safetensors) into freshly built components of the same shape."""
    from safetensors.torch import load_file

    for module, sub in ((unet, "unet"), (text_encoder, "text_encoder")):
        files = sorted((folder / sub).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"pretrain.init_from={folder}: no {sub}/*.safetensors there")
        state = {k: v for f in files for k, v in load_file(f).items()}
        try:
            missing, unexpected = module.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"pretrain.init_from={folder}: {sub} does not match this architecture "
                             f"({str(e).strip().splitlines()[-1].strip()})") from None
        if missing or unexpected:
            raise ValueError(f"pretrain.init_from={folder}: {sub} does not match this architecture "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def _continue_from(cfg: PretrainConfig, unet, text_encoder) -> dict:
    """With ``init_from``: its weights loaded, and its recipe returned, so that the whole recipe travels with
    the weights (a continued run records the config of the run it continues)."""
    if not cfg.init_from:
        return {}
    _load_weights(unet, text_encoder, Path(cfg.init_from))
    earlier = Path(cfg.init_from) / "visalign_pretrain.json"
    return {"continued_from": json.loads(earlier.read_text())} if earlier.exists() else {}


def _declarations(cfg: PretrainConfig, learned_k) -> dict:
    """The files a saved base declares beside its weights: sampling defaults and, for k-Diff, its k."""
    declared = {SAMPLING_FILE: sampling_declaration(cfg.prediction_type)}
    if cfg.prediction_type == "k":
        k_now = learned_k().item() if learned_k is not None else cfg.k
        declared[PARAMETERISATION_FILE] = {"target": "k", "k": k_now, "learned": cfg.learn_k}
    return declared


def _denoising_loss(cfg: PretrainConfig, scheduler, pred, x0, eps, t, learned_k):
    """The pretraining loss: MSE to the scheduler's ε or v target, or k-Diff's error measured in v-space."""
    if cfg.prediction_type != "k":
        return ((pred.float() - denoising_target(scheduler, x0, eps, t)) ** 2).mean()
    k = learned_k() if learned_k is not None else cfg.k  # k changes what the network outputs, not the weighting
    alpha_bar = scheduler.alphas_cumprod[t]
    return velocity_error(pred, k_target(x0, eps, alpha_bar, k), alpha_bar, k).mean()


def pretrain(cfg: PretrainConfig, out: str | Path, log_every: int = 20) -> Path:
    """Train the base from scratch and write it (EMA weights) to ``out`` every ``save_every`` steps."""
    import copy

    from diffusers.training_utils import EMAModel
    from tqdm import tqdm

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "model_index.json").exists())):
        # the base is written by replacing the whole folder: never over files pretrain did not write
        raise UserError(f"--out {out}: exists and is not a model folder pretrain wrote; choose a new or empty --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    unet, text_encoder, tokenizer, scheduler = build_components(cfg)
    history = _continue_from(cfg, unet, text_encoder)
    unet.train()
    text_encoder.train()
    learned_k = LearnedK(cfg.k) if cfg.prediction_type == "k" and cfg.learn_k else None
    params = list(unet.parameters()) + list(text_encoder.parameters())
    k_scale = cfg.k_lr / cfg.lr if cfg.k_lr and cfg.lr else 1.0  # k's own learning rate, on the same schedule
    groups = [{"params": params, "scale": 1.0}] + ([{"params": [learned_k.logit], "weight_decay": 0.0,
                                                     "scale": k_scale}] if learned_k is not None else [])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=1e-2)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * frac)))

    ema_unet, ema_te = EMAModel(unet.parameters(), decay=cfg.ema_decay), EMAModel(
        text_encoder.parameters(), decay=cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    alphas = scheduler.alphas_cumprod
    log: list[dict] = []
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="pretrain shapes-base", dynamic_ncols=True)
    for step in bar:
        x0, prompts = render_batch(cfg.step_offset + step, cfg)
        drop = torch.rand(len(prompts), generator=gen) < cfg.caption_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        ids = tokenizer(prompts, padding="max_length", max_length=cfg.max_tokens, truncation=True,
                        return_tensors="pt").input_ids
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(prompts),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["scale"]
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            cond = text_encoder(ids).last_hidden_state
            pred = unet(x_t, t, cond).sample
        loss = _denoising_loss(cfg, scheduler, pred, x0, eps, t, learned_k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.step(unet.parameters())
        ema_te.step(text_encoder.parameters())
        if step % log_every == 0:
            value = float(loss.detach())
            log.append({"step": step, "loss": value, "lr": lr_at(step), "seconds": time.time() - t0}
                       | ({"k": learned_k().item()} if learned_k is not None else {}))
            bar.set_postfix(loss=f"{value:.4f}", img_s=f"{(step + 1) * cfg.batch_size / (time.time() - t0):.0f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            eu, et = copy.deepcopy(unet), copy.deepcopy(text_encoder)
            ema_unet.copy_to(eu.parameters())
            ema_te.copy_to(et.parameters())
            cfg_dict = asdict(cfg) | {"steps_done": cfg.step_offset + step + 1} | history
            declared = _declarations(cfg, learned_k)
            save_pipeline_folder(out, eu.eval(), et.eval(), tokenizer, scheduler,
                                 extra={"visalign_pretrain.json": cfg_dict, "training_log.json": log, **declared})
            if cfg.save_raw:
                save_pipeline_folder(out.with_name(out.name + "-raw"), unet, text_encoder, tokenizer, scheduler,
                                     extra={"visalign_pretrain.json": cfg_dict | {"raw": True}, **declared})
                unet.train()
                text_encoder.train()
    return out
