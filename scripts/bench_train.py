"""Step time of each method against its compute limit, on identical cached inputs; memory; savings.

    python scripts/bench_train.py [--model pixel|sd15|sdxl|sd3] [--size tiny|real-latent]
                                  [--methods diffusion_dpo,kto,...] [--precision fp32,bf16] [--steps 20]

Each measurement runs in its own process (so peak RSS is that measurement's own). Printed:
1. per method and precision: median step time after warm-up, its limit — the forwards and backwards
   the method cannot avoid, timed alone on the same tensors (pair methods: policy forward + backward
   on the 2B images, reference forward on 2B under no_grad, optimizer step; MaPO: no reference) —
   step/limit, pairs/s, peak RSS and the step's own memory (peak − RSS before the first step), and the
   process start-up time to the end of the first step. `sft` is a LoRA SFT step on the same 2B images:
   the memory baseline that shows the reference costs no second model.
2. fp32 and bf16 loss curves of Diffusion-DPO from one seed, side by side.
3. InPO/SmPO: inversion with the current policy every step (the authors' recipe) against inversions
   by the frozen reference, computed once and cached.
4. D3PO: a training step with a reference forward per denoising step against reusing the sampler's
   own log-probs (valid while the sampling policy is the reference).
5. Diffusion-DPO with channels_last and with torch.compile against the plain step (kept only on a win).
``--size real-latent`` (sd15 only): SD1.5's real latent size (512x512 images, 64x64 latents) with a
real-size VAE (random init): the cache on against the cache off (VAE and text encoders every step).
"""

from __future__ import annotations

import time

T_PROCESS = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"pixel": ("shapes", "pixel"), "sd15": ("sd15", "sd"), "sdxl": ("sdxl", "sdxl"), "sd3": ("sd3", "sd3")}
METHOD_OVERRIDES = {
    "sft": ["objective=diffusion_dpo"],  # the model set-up of a pair method; the step is SFT (see _policy_step)
    "inpo": ["objective=inpo", "objective.inversion_model=reference", "objective.cache_inversions=true",
             "objective.eta=0"],
    "inpo-policy": ["objective=inpo"],
    "smpo": ["objective=smpo", "objective.inversion_model=reference", "objective.cache_inversions=true"],
    "smpo-policy": ["objective=smpo"],
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median_times(fns, steps: int, warmup: int = 3) -> list[float]:
    """Median time of each function, calls interleaved (f1, f2, f1, f2, ...) so that drift in the
    machine's speed (shared cores, clocks) hits every function alike and cancels in their ratio."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(steps):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


# ---------------------------------------------------------------- fixtures (model folder + data), built once
def write_pairs(path: Path, n: int, size: int = 32, scores: bool = True, seed: int = 0) -> Path:
    """``n`` Pick-a-Pic-schema rows of random JPEGs (the benchmark times steps, not what they learn)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)

    def jpeg(shape) -> bytes:
        buf = io.BytesIO()
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(buf, "JPEG")
        return buf.getvalue()

    prompts = ["a photo of a red circle", "a photo of two squares", "a photo of a blue triangle"]
    rows = [{"caption": prompts[i % len(prompts)], "jpg_0": jpeg((size, size, 3)), "jpg_1": jpeg((size, size, 3)),
             "label_0": float(i % 2), **({"score_0": float(rng.random()), "score_1": float(rng.random())}
                                          if scores else {})} for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def build_fixture(model: str, size: str, tmp: Path, batch_size: int, data: str = "") -> dict:
    from visalign.models.tiny import build_tiny

    if size == "real-latent":
        if model != "sd15":
            raise SystemExit("--size real-latent is built for --model sd15 (SD1.5's 64x64 latents)")
        model_dir, image_size = build_real_latent_sd15(tmp / "sd15-real-latent"), 512
    elif model == "pixel" and (ROOT / "assets/shapes-base/unet").exists():
        model_dir, image_size = ROOT / "assets/shapes-base", 32  # the real ShapesWorld base
    else:
        model_dir, image_size = build_tiny(model, tmp / model), 32
    # at real size the cache (VAE on every row) is the slow part on a CPU: one batch of rows is enough
    rows = batch_size if size == "real-latent" else 64
    data = data or write_pairs(tmp / "pairs.parquet", n=rows, size=image_size, scores=True)
    return {"model_dir": str(model_dir), "data": str(data), "tmp": str(tmp)}


def build_real_latent_sd15(out: Path) -> Path:
    """SD1.5's real VAE (random init) with a small UNet at 64x64 latents, as an ordinary diffusers folder."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from visalign.models.tiny import tiny_clip_config, tiny_ddim, tiny_tokenizer

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        sample_size=512, scaling_factor=0.18215)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(tiny_clip_config(tok)), tokenizer=tok, unet=unet,
                                   scheduler=tiny_ddim(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


# ---------------------------------------------------------------- one measurement (in its own process)
def _setup(job: dict):
    from visalign.config import load_config
    from visalign.data.cache import CachedDataset, build_cache, cache_dir_for
    from visalign.data.pairs import PreferenceDataset
    from visalign.train.build import build_backbone, build_method, build_optimizer, prepare_trainable

    torch.manual_seed(0)
    preset, backbone_name = PRESETS[job["model"]]
    over = [f"model.name={backbone_name}", f"model.path={job['model_dir']}", f"data.path={job['data']}",
            *METHOD_OVERRIDES.get(job["method"], [f"objective={job['method']}"])]
    if job["model"] == "sd3":
        over.append("model.max_sequence_length=8")
    cfg = load_config(preset, [], over)
    bb = build_backbone(cfg.model)
    params = prepare_trainable(bb, cfg)
    if job.get("channels_last"):
        bb.unwrapped().to(memory_format=torch.channels_last)
    if job.get("compile"):
        bb.denoiser = torch.compile(bb.denoiser)
    opt = build_optimizer(params, cfg)
    method = build_method(cfg.objective, guidance=cfg.train.guidance)
    ds = PreferenceDataset(job["data"], resolution=bb.resolution)
    if job.get("cache", True):
        cached = CachedDataset(build_cache(bb, ds, cache_dir_for(ds, bb, str(Path(job["tmp"]) / "cache"))), ds)
        batch = cached.collate([cached[i] for i in range(job["batch_size"])])
    else:
        batch = ds.collate([ds[i] for i in range(job["batch_size"])])
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=job["precision"] == "bf16")
    return bb, method, batch, opt, ctx


def _train_step(method, bb, batch, opt, ctx) -> float:
    with ctx:
        out = method(bb, batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss)


def _policy_step(bb, batch, opt, ctx, reference: bool) -> float:
    """Policy forward + backward on the 2B images (+ the reference forward on 2B under no_grad when asked)
    and the optimizer step: a pair method's limit, or, without the reference, a LoRA SFT step."""
    from visalign.objectives.base import denoising_errors, model_inputs

    with ctx:
        x0, cond = model_inputs(bb, batch)
        err, _ = denoising_errors(bb, x0, cond, reference=reference)
    err.mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(err.mean())


def measure(job: dict) -> dict:
    """Step, limit, memory and start-up for one (method, precision), or a loss curve (job['curve'])."""
    torch.set_num_threads(job["threads"])
    bb, method, batch, opt, ctx = _setup(job)
    if job["method"] == "sft":
        def step_fn(method, bb, batch, opt, ctx):
            return _policy_step(bb, batch, opt, ctx, reference=False)
    else:
        step_fn = _train_step
    uses_reference = getattr(method, "uses_reference", True)
    if job.get("curve"):
        return {"losses": [step_fn(method, bb, batch, opt, ctx) for _ in range(job["curve"])]}
    rss_before = _rss_mb()
    step_fn(method, bb, batch, opt, ctx)
    startup = time.time() - T_PROCESS
    for _ in range(2):
        step_fn(method, bb, batch, opt, ctx)
    peak = _rss_mb()  # the method's own steps only: the limit's passes below are not counted
    t_step, t_limit = _median_times([lambda: step_fn(method, bb, batch, opt, ctx),
                                     lambda: _policy_step(bb, batch, opt, ctx, uses_reference)], job["steps"])
    return {"step_ms": t_step * 1e3, "limit_ms": t_limit * 1e3, "ratio": t_step / t_limit,
            "pairs_s": job["batch_size"] / t_step, "peak_rss_mb": peak, "step_mem_mb": peak - rss_before,
            "startup_s": startup}


def measure_d3po(job: dict) -> dict:
    """One D3PO step with a reference forward per denoising step vs reusing the sampler's log-probs."""
    from visalign.config import Component
    from visalign.models.lora import LoraSpec, add_lora
    from visalign.objectives.d3po import D3PO
    from visalign.train.build import build_backbone

    torch.set_num_threads(job["threads"])
    bb = build_backbone(Component(PRESETS[job["model"]][1], {"path": job["model_dir"]}))
    add_lora(bb, LoraSpec())
    params = [p for p in bb.unwrapped().parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    method = D3PO(steps=10, prompts_per_round=job["batch_size"])
    from visalign.worlds.shapes.render import prompt_records

    prompts = [r["prompt"] for r in prompt_records("train")]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        items = method.make_round(bb, prompts, gen)
    batch = method.take(items, torch.arange(job["batch_size"]))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=job["precision"] == "bf16")

    def step(reuse: bool) -> None:
        batch.extras["reuse_ref"] = torch.tensor(reuse)
        _train_step(method, bb, batch, opt, ctx)

    t_ref, t_reuse = _median_times([lambda: step(False), lambda: step(True)], job["steps"])
    out = {"reference": t_ref * 1e3, "reuse": t_reuse * 1e3}
    out["pairs"] = len(batch.prompts)
    return out


# ---------------------------------------------------------------- driver
def run_job(job: dict) -> dict:
    """Run ``job`` in a fresh interpreter (own peak RSS, own start-up time) and return its JSON."""
    env = os.environ | {"PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error",
                        "DIFFUSERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"job {job} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_rows(args, base: dict, prec: str, report: dict) -> None:
    """torch.compile per method: eager and compiled step, the speed-up, the compile start-up (the compiled
    process's start-up minus the eager one's) and the break-even run length, start-up / time saved per step
    (what ``train.compile=auto``'s ``compile_min_steps`` is set from)."""
    methods = [m for m in args.compile_methods.split(",") if m]
    if not methods:
        return
    print(f"\n{'torch.compile, ' + prec:<20}{'eager ms':>9}{'compiled':>10}{'speed-up':>10}{'start-up s':>11}"
          f"{'break-even steps':>18}")
    for name in methods:
        eager = report.get(f"{name}_{prec}") or run_job(base | {"method": name, "precision": prec})
        try:
            comp = run_job(base | {"method": name, "precision": prec, "compile": True})
        except SystemExit as e:
            print(f"{name:<20}failed: {str(e).splitlines()[-1][:80]}")
            continue
        extra = comp["startup_s"] - eager["startup_s"]
        saved = (eager["step_ms"] - comp["step_ms"]) / 1000
        even = extra / saved if saved > 0 else float("inf")
        report[f"{name}_{prec}_compile"] = comp | {"compile_startup_s": extra, "break_even_steps": even}
        print(f"{name:<20}{eager['step_ms']:>9.1f}{comp['step_ms']:>10.1f}{eager['step_ms'] / comp['step_ms']:>9.2f}x"
              f"{extra:>11.1f}{even:>18.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile-methods", default="diffusion_dpo",
                    help="methods timed with torch.compile in the options section (comma-separated; empty: none)")
    ap.add_argument("--model", default="pixel", choices=tuple(PRESETS))
    ap.add_argument("--size", default="tiny", choices=("tiny", "real-latent"))
    ap.add_argument("--methods", default="diffusion_dpo,kto,mapo,inpo,smpo,sft")
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sections", default="limit,options,curves,inversion,d3po")
    ap.add_argument("--data", default="", help="pairs to train on (default: synthetic random-image pairs)")
    ap.add_argument("--json", default="", help="also write every figure to this JSON file")
    ap.add_argument("--job", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        from visalign.cli import quiet_libraries

        quiet_libraries()
        job = json.loads(args.job)
        print(json.dumps(measure_d3po(job) if job.get("kind") == "d3po" else measure(job)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="visalign-bench-"))
    fx = build_fixture(args.model, args.size, tmp, args.batch_size, args.data)
    base = {**fx, "model": args.model, "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads}
    precisions = args.precision.split(",")
    sections = args.sections.split(",")
    report: dict = {"model": args.model, "size": args.size, "batch_size": args.batch_size, "threads": args.threads,
                    "cpu": _cpu_name(), "torch": torch.__version__}
    print(f"model {args.model} ({args.size}; {fx['model_dir']}), batch {args.batch_size} pairs, "
          f"{args.threads} thread(s), {report['cpu']}")

    if args.size == "real-latent":
        print(f"\n{'precision':<10}{'cache on ms':>13}{'cache off ms':>14}{'off/on':>8}")
        for prec in precisions:
            on = run_job(base | {"method": "diffusion_dpo", "precision": prec})
            off = run_job(base | {"method": "diffusion_dpo", "precision": prec, "cache": False})
            report[f"real_latent_{prec}"] = {"cache_on": on, "cache_off": off}
            print(f"{prec:<10}{on['step_ms']:>13.0f}{off['step_ms']:>14.0f}{off['step_ms'] / on['step_ms']:>8.2f}"
                  f"   (cache on: step/limit {on['ratio']:.2f})")

    if "limit" in sections:
        print(f"\n{'method':<15}{'prec':<6}{'step ms':>9}{'limit ms':>10}{'step/limit':>11}{'pairs/s':>9}"
              f"{'peak RSS MB':>12}{'step mem MB':>12}{'start-up s':>11}")
        for prec in precisions:
            for name in args.methods.split(","):
                r = run_job(base | {"method": name, "precision": prec})
                report[f"{name}_{prec}"] = r
                ratio = "   (SFT)" if name == "sft" else f"{r['ratio']:>11.2f}"
                print(f"{name:<15}{prec:<6}{r['step_ms']:>9.1f}{r['limit_ms']:>10.1f}{ratio:>11}{r['pairs_s']:>9.1f}"
                      f"{r['peak_rss_mb']:>12.0f}{r['step_mem_mb']:>12.1f}{r['startup_s']:>11.1f}")
            if f"diffusion_dpo_{prec}" in report and f"sft_{prec}" in report:
                d, s = report[f"diffusion_dpo_{prec}"], report[f"sft_{prec}"]
                print(f"  {prec}: LoRA Diffusion-DPO / LoRA SFT peak RSS {d['peak_rss_mb'] / s['peak_rss_mb']:.3f}")

    if "options" in sections:
        prec = precisions[-1]
        plain = report.get(f"diffusion_dpo_{prec}") or run_job(base | {"method": "diffusion_dpo", "precision": prec})
        print(f"\n{'Diffusion-DPO, ' + prec:<28}{'step ms':>9}{'vs plain':>10}{'start-up s':>11}")
        print(f"{'plain (SDPA)':<28}{plain['step_ms']:>9.1f}{'':>10}{plain['startup_s']:>11.1f}")
        for option in ("channels_last", "compile"):
            try:
                r = run_job(base | {"method": "diffusion_dpo", "precision": prec, option: True})
            except SystemExit as e:
                print(f"{option:<28}failed: {str(e).splitlines()[-1][:80]}")
                continue
            report[f"diffusion_dpo_{prec}_{option}"] = r
            print(f"{option:<28}{r['step_ms']:>9.1f}{plain['step_ms'] / r['step_ms']:>9.2f}x{r['startup_s']:>11.1f}")
        compile_rows(args, base, prec, report)

    if "curves" in sections and len(precisions) > 1:
        curves = {p: run_job(base | {"method": "diffusion_dpo", "precision": p, "curve": 30})["losses"]
                  for p in precisions}
        a, b = torch.tensor(curves[precisions[0]]), torch.tensor(curves[precisions[1]])
        report["curves"] = curves
        print(f"\nDiffusion-DPO loss, 30 steps from one seed: {precisions[0]} mean {a.mean():.4f}, {precisions[1]} "
              f"mean {b.mean():.4f}; max |difference| {float((a - b).abs().max()):.4f}, "
              f"correlation {float(torch.corrcoef(torch.stack([a, b]))[0, 1]):.3f}")

    if "inversion" in sections and args.model != "sdxl":
        print(f"\n{'inversion':<34}{'step ms':>9}{'speed-up':>10}")
        for fam in ("inpo", "smpo"):
            prec = precisions[-1]
            pol = report.get(f"{fam}-policy_{prec}") or run_job(base | {"method": f"{fam}-policy", "precision": prec})
            ref = report.get(f"{fam}_{prec}") or run_job(base | {"method": fam, "precision": prec})
            report[f"{fam}-policy_{prec}"], report[f"{fam}_{prec}"] = pol, ref
            print(f"{fam + ' policy, every step (authors)':<34}{pol['step_ms']:>9.1f}")
            print(f"{fam + ' reference, cached':<34}{ref['step_ms']:>9.1f}{pol['step_ms'] / ref['step_ms']:>9.2f}x")

    if "d3po" in sections and args.model in ("pixel", "sd15", "sd3"):
        prec = precisions[-1]
        r = run_job(base | {"kind": "d3po", "precision": prec, "method": "d3po"})
        report[f"d3po_{prec}"] = r
        print(f"\nD3PO step ({r['pairs']} trajectory pairs, 10 denoising steps, {prec}): reference forward per step "
              f"{r['reference']:.1f} ms, sampler log-probs reused {r['reuse']:.1f} ms "
              f"(saving {1 - r['reuse'] / r['reference']:.0%})")

    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
