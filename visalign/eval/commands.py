"""The ``visalign eval ...`` commands: GenEval-style accuracy, FID and reward win-rates."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import require_fits_memory
from .configs import CalibrateConfig, FidConfig, GenevalConfig, WinrateConfig


def load_backbone_cli(model: str, backbone: str | None, lora: str | None, bf16: bool = False):
    """A backbone from a folder (family from model_index.json unless named), with an optional LoRA, in eval mode."""
    from ..models.load import detect_backbone, for_sampling, resolve_path
    from ..registry import load_all

    load_all()
    path = resolve_path(model)
    return for_sampling(backbone or detect_backbone(path), path, lora, bf16)


def cmd_eval_geneval(cfg: GenevalConfig) -> None:
    import torch

    from ..eval.geneval import format_table, generate_and_score, write_results
    from ..models.load import sampling_guidance
    from ..registry import DETECTORS
    from .rules import read_metadata

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    records = read_metadata(cfg.metadata)
    if cfg.per_task:
        records = first_per_task(records, cfg.per_task)
    options = {"owlv2": lambda: dict(detector=cfg.owl, clip_arch=cfg.clip_arch, clip_pretrained=cfg.clip_pretrained,
                                     **_thresholds(cfg.thresholds))}
    detector = DETECTORS.build(cfg.detector, **options.get(cfg.detector, dict)())
    detector.check_records(records, cfg.metadata)  # before the model loads
    bb = load_backbone_cli(cfg.model, cfg.backbone, cfg.lora, cfg.bf16)
    guidance = sampling_guidance(bb, cfg.guidance)
    results = generate_and_score(bb, records, cfg.samples_per_prompt, cfg.seed, cfg.steps, guidance,
                                 detector=detector)
    metrics = write_results(results, cfg.out, extra={
        "model": cfg.model, "lora": cfg.lora, "metadata": cfg.metadata, "seed": cfg.seed,
        "samples_per_prompt": cfg.samples_per_prompt, "steps": cfg.steps, "guidance": guidance,
        "bf16": cfg.bf16,
        "detector": getattr(detector, "name", None) or f"owlv2:{cfg.owl} + open_clip:{cfg.clip_arch}"})
    print(format_table({Path(cfg.lora or cfg.model).name: metrics}))
    print(f"wrote {Path(cfg.out) / 'metrics.json'} and {Path(cfg.out) / 'grid.png'}")


def first_per_task(records: list[dict], n: int) -> list[dict]:
    """The first ``n`` records of each task (GenEval's ``tag``), in file order."""
    counts: dict[str, int] = {}
    out = []
    for r in records:
        tag = r.get("tag", "")
        if counts.get(tag, 0) < n:
            counts[tag] = counts.get(tag, 0) + 1
            out.append(r)
    return out


def _thresholds(path: str | None) -> dict:
    """The detector thresholds a `calibrate-detector` run wrote, or {} for GenEval's defaults."""
    if not path:
        return {}
    from ..errors import UserError

    try:
        fit = json.loads(Path(path).read_text())
        return {"threshold": float(fit["threshold"]), "counting_threshold": float(fit["counting_threshold"])}
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"--thresholds {path}: expected the JSON that `visalign eval calibrate-detector` writes "
                        "(with threshold and counting_threshold)") from None


def cmd_eval_calibrate_detector(cfg: CalibrateConfig) -> None:
    from .calibrate import calibrate, read_labels
    from .open_vocab import OpenVocabDetector

    labels = read_labels(cfg.labels)
    fit = calibrate(OpenVocabDetector(cfg.owl), labels)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(fit | {"labels": cfg.labels, "detector": cfg.owl}, indent=2))
    tmp.replace(out)
    d = fit["geneval_defaults"]
    print(f"threshold {fit['threshold']:.3f} (presence accuracy {fit['presence_accuracy']:.3f}; GenEval's 0.3: "
          f"{d['presence_accuracy']:.3f}), counting threshold {fit['counting_threshold']:.3f} (exact-count accuracy "
          f"{fit['counting_accuracy']:.3f}; GenEval's 0.9: {d['counting_accuracy']:.3f}) on {fit['n']} labels")
    print(f"wrote {out}; use it with `visalign eval geneval --detector owlv2 --thresholds {out}`")


def real_images(source: str, n: int, seed: int = 0):
    """[N, 3, H, W] uint8 real images: 'shapes:SPLIT' renders, a folder of images, or a dataset with images."""
    import torch

    from ..registry import REAL_IMAGES

    scheme, _, spec = source.partition(":")
    if spec and scheme.isidentifier() and scheme in REAL_IMAGES:  # a world's own images, e.g. shapes:eval renders
        return REAL_IMAGES.get(scheme)(spec, n, seed, f"--real {source}")
    from ..data.pairs import decode_image, load_any

    p = Path(source)
    if p.is_dir() and not list(p.glob("*.parquet")):
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))[:n]
        pil = [decode_image(str(f)) for f in files]
    else:
        ds = load_any(source)
        col = next((c for c in ("image", "jpg_0", "images") if c in ds.column_names), None)
        if col is None:
            raise FileNotFoundError(f"{source}: no image column (image, jpg_0 or images)")
        vals = [v[0] if isinstance(v, list) else v for v in ds[col][:n]]
        pil = [decode_image(v) for v in vals]
    if not pil:
        raise FileNotFoundError(f"{source}: no images found")
    size = min(min(im.size) for im in pil)
    from ..data.pairs import prepare_image

    return torch.stack([(prepare_image(im, size).tensor * 255 + 0.5).to(torch.uint8) for im in pil])


def cmd_eval_fid(cfg: FidConfig) -> None:
    import torch

    from ..data.prompts import read_prompts
    from ..eval.fid import fid, protocol
    from ..models.load import sampling_guidance

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    prompts = read_prompts(cfg.prompts, key="prompts")
    bb = load_backbone_cli(cfg.model, cfg.backbone, cfg.lora, cfg.bf16)
    side = bb.resolution
    # FID holds every sample (fp32) and every real image (uint8) at once: a size that cannot fit is refused
    # here, before any image is rendered or sampled
    require_fits_memory(cfg.n * 3 * side * side * 5, f"--n {cfg.n}: {cfg.n:,} images of 3x{side}x{side} held for FID")
    real = real_images(cfg.real, cfg.n, seed=cfg.seed + 1)
    fakes = []
    gen = torch.Generator().manual_seed(cfg.seed)
    guidance = sampling_guidance(bb, cfg.guidance)
    with torch.no_grad():
        for i in range(0, cfg.n, 64):
            batch = [prompts[j % len(prompts)] for j in range(i, min(i + 64, cfg.n))]
            fakes.append(bb.sample(batch, steps=cfg.steps, guidance=guidance, generator=gen).images.cpu())
    weights = cfg.inception_weights if cfg.feature == "inception" else cfg.feature_weights
    value = fid(real, torch.cat(fakes), cfg.feature, weights)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"fid": value, **protocol(cfg.feature, weights, len(real), cfg.n), "model": cfg.model,
              "lora": cfg.lora, "real": cfg.real, "seed": cfg.seed, "steps": cfg.steps, "guidance": guidance}
    (out / "fid.json").write_text(json.dumps(result, indent=2))
    print(f"FID ({cfg.feature} features, {cfg.n} vs {len(real)} images): {value:.3f}  -> {out / 'fid.json'}")


def cmd_eval_winrate(cfg: WinrateConfig) -> None:
    import torch

    from ..data.prompts import read_prompts
    from ..eval.geneval import sample_seed
    from ..eval.winrate import paired_term_changes, win_rate
    from ..models.load import sampling_guidance
    from ..rewards.base import build_reward

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from ..data.make_dataset import parse_rewards
    from ..rewards.base import check_prompts

    prompts = read_prompts(cfg.prompts, key="prompts")
    [(name, _, kwargs)] = parse_rewards([cfg.reward])
    reward = build_reward({"name": name, **kwargs})
    check_prompts(reward, prompts)  # before any model loads or image is sampled
    scores, guidance, terms = {}, {}, {}
    for name, model, lora in (("model", cfg.model, cfg.lora), ("baseline", cfg.baseline, cfg.baseline_lora)):
        bb = load_backbone_cli(model, cfg.backbone, lora, cfg.bf16)
        guidance[name] = sampling_guidance(bb, cfg.guidance)  # each model at its own declared guidance
        jobs = [(i, k) for i in range(len(prompts)) for k in range(cfg.samples_per_prompt)]
        out = []
        with torch.no_grad():
            for start in range(0, len(jobs), 32):
                part = jobs[start:start + 32]
                noise = torch.stack([torch.randn(bb.sample_shape, generator=torch.Generator().manual_seed(
                    sample_seed(cfg.seed, i, k))) for i, k in part])
                imgs = bb.sample([prompts[i] for i, _ in part], steps=cfg.steps, guidance=guidance[name],
                                 latents=noise).images.cpu()
                out.append(reward(imgs, [prompts[i] for i, _ in part]))
                if hasattr(reward, "terms"):  # a reward with named parts (the rater): keep each for the table
                    terms.setdefault(name, []).extend(reward.terms(im, prompts[i]) for im, (i, _) in zip(imgs, part))
        scores[name] = torch.cat(out)
    result = win_rate(scores["model"], scores["baseline"]) | {
        "reward": cfg.reward, "model": cfg.model, "lora": cfg.lora, "baseline": cfg.baseline,
        "prompts": cfg.prompts, "samples_per_prompt": cfg.samples_per_prompt, "seed": cfg.seed,
        "steps": cfg.steps, "guidance": guidance}
    if terms:
        result["terms"] = paired_term_changes(terms["model"], terms["baseline"])
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "winrate.json").write_text(json.dumps(result, indent=2))
    for term, v in result.get("terms", {}).items():
        print(f"  {term:<8} {v['baseline']:.3f} -> {v['model']:.3f}  paired change {v['change']:+.4f} ± {v['se']:.4f}")
    print(f"win rate {result['win_rate']:.3f} [95% CI {result['ci_low']:.3f}, {result['ci_high']:.3f}] "
          f"over {result['n']} paired samples ({cfg.reward})")

