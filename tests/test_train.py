"""The trainer: every tiny backbone in LoRA and full mode, exact resume after SIGKILL, 2 processes, bad data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import family_of, family_variants, finetune_args, load_lora_into, run_pipeline, tiny_pipeline, write_pairs
from safetensors.torch import load_file

from visalign.config import load_config
from visalign.train.loop import NonFiniteError, train


def _overrides(model_dir, data, out, family="pixel") -> list[str]:
    over = [*finetune_args(family, model_dir)[1:], f"data.path={data}",
            f"train.output_dir={out}", "train.steps=3", "train.batch_size=2", "train.lr=1e-3", "train.log_every=1",
            "train.save_every=0", "train.threads=1", "train.tracker=none", "train.mixed_precision=no"]
    return over


def _cfg(model_dir, data, out, family="pixel", extra=()):
    return load_config(finetune_args(family, model_dir)[0], [], _overrides(model_dir, data, out, family) + list(extra))


def _cli_train(model_dir, data, out, family="pixel", extra=()) -> dict:
    """`visalign finetune MODEL key=value ...` through the CLI entry point; returns summary.json."""
    from visalign.cli import main

    preset = finetune_args(family, model_dir)[0]
    assert main(["finetune", preset, *_overrides(model_dir, data, out, family), *extra]) == 0
    return json.loads((Path(out) / "summary.json").read_text())


def _tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.relative_to(folder)}:{k}"] = v
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.parquet", n=8, labels=[1, 0, 1, 0.5, 1, 0, 1, 0])


@pytest.mark.parametrize("family", family_variants())
def test_lora_run_changes_only_adapters_and_reloads(tiny_dir, pairs, tmp_path, family):
    import diffusers

    model = tiny_dir(family)
    before = _tensors(model)
    summary = _cli_train(model, pairs, tmp_path / "run", family)
    assert summary["steps"] == 3 and summary["ties_dropped"] == 1
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert {"implicit_acc", "logit_mean", "err_w", "err_l", "ref_err_w", "ref_err_l", "grad_norm", "lr"} <= set(
        metrics[-1])
    after = _tensors(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    lora = load_file(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors")
    assert lora and all("lora" in k for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "README.md").exists()
    if hasattr(diffusers, family_of(family)[1].pipeline_class):
        pipe = tiny_pipeline(model)
        load_lora_into(pipe, tmp_path / "run" / "lora", family_of(family)[1].lora_prefix)
        img = run_pipeline(pipe, "a cat", 32, num_inference_steps=2)
        assert torch.isfinite(img).all()


@pytest.mark.parametrize("family", family_variants())
def test_full_run_changes_only_the_denoiser_and_reloads(tiny_dir, pairs, tmp_path, family):
    import diffusers

    model = tiny_dir(family)
    summary = _cli_train(model, pairs, tmp_path / "run", family,
                         ["lora.enabled=false", "train.lr=1e-4", "train.guidance=2.5"])
    out = Path(summary["model"])
    from visalign.models.load import default_guidance

    assert default_guidance(family, str(out)) == 2.5  # the fine-tune declares the guidance it was trained at
    sub = family_of(family)[1].denoiser_subfolder
    base, tuned = _tensors(model), _tensors(out)
    assert base.keys() == tuned.keys()
    changed = {k.split("/")[0] for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == {sub}
    if not hasattr(diffusers, family_of(family)[1].pipeline_class):  # pixel: a folder of plain parts
        diffusers.UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    else:
        images = run_pipeline(tiny_pipeline(out), "a cat", 32, num_inference_steps=2)
        assert torch.isfinite(images).all()


def _cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "visalign", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_dir, pairs, tmp_path):
    model = tiny_dir("pixel")
    common = ["finetune", "shapes", f"model.path={model}", f"data.path={pairs}", "train.steps=8",
              "train.batch_size=2", "train.lr=1e-3", "train.save_every=2", "train.threads=1", "train.tracker=none"]
    ref = _cli(common + [f"train.output_dir={tmp_path / 'ref'}"])
    assert ref.wait(300) == 0, ref.stdout.read()
    run = tmp_path / "killed"
    proc = _cli(common + [f"train.output_dir={run}"])
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-0000004").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before step 4"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "lora").exists()
    resumed = _cli(common + [f"train.output_dir={run}", "train.resume=latest"])
    assert resumed.wait(300) == 0, resumed.stdout.read()
    a = load_file(tmp_path / "ref" / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    summary, whole = (json.loads((d / "summary.json").read_text()) for d in (run, tmp_path / "ref"))
    assert summary["steps"] == 8
    # the totals are the run's, through the checkpoint it resumed from, as if it had never been killed
    assert summary["pairs_seen"] == whole["pairs_seen"] == 8 * 2
    resumed_at = 8 - summary["pairs_seen_this_process"] // 2
    assert resumed_at >= 4 and (run / "checkpoints" / f"step-{resumed_at:07d}").is_dir()
    state = json.loads((run / "checkpoints" / f"step-{resumed_at:07d}" / "visalign_state.json").read_text())
    assert state["progress"]["pairs_seen"] == resumed_at * 2
    assert summary["seconds"] == pytest.approx(state["progress"]["seconds"] + summary["seconds_this_process"],
                                               abs=0.5)


def test_two_cpu_processes_with_accelerate_launch(tiny_dir, pairs, tmp_path):
    """`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m visalign finetune ...` (gloo)."""
    out = tmp_path / "ddp"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = str(Path(sys.executable).parent / "accelerate")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", "29731", "-m", "visalign", "finetune", "shapes",
           *_overrides(tiny_dir("pixel"), pairs, out), "train.steps=2"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summaries = [json.loads(block) for block in _json_blocks(r.stdout)]
    assert len(summaries) == 2 and sorted(s["rank"] for s in summaries) == [0, 1]
    assert all(s["world_size"] == 2 for s in summaries)
    assert summaries[0]["weights_sha256"] == summaries[1]["weights_sha256"]  # both ranks end identical
    assert summaries[0]["pairs_seen"] == 2 * 2 * 2  # 2 steps x batch 2 x 2 processes
    assert sum("lora" in s for s in summaries) == 1  # only the main process writes outputs
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert len(list((out / "lora").iterdir())) == 1


def _json_blocks(text: str) -> list[str]:
    blocks, depth, start = [], 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
            start = i if depth == 1 else start
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                blocks.append(text[start:i + 1])
    return [b for b in blocks if '"world_size"' in b]


def test_ties_corrupt_rows_and_missing_columns(tmp_path):
    from visalign.data.pairs import DataError, PreferenceDataset, collate

    path = write_pairs(tmp_path / "p.parquet", n=6, labels=[1, 0.5, 0, 0.5, 1, 0], corrupt_rows=(2,))
    ds = PreferenceDataset(str(path), resolution=16)
    assert ds.ties_dropped == 2 and len(ds) == 4
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch.size == 3 and ds.corrupt_skipped == 1
    assert batch.images.shape == (3, 2, 3, 16, 16) and torch.all(batch.label == 1.0)
    with pytest.raises(DataError, match=r"row 2: corrupt image"):
        strict = PreferenceDataset(str(path), resolution=16, on_error="raise")
        [strict[i] for i in range(len(strict))]
    keep = PreferenceDataset(str(path), resolution=16, drop_ties=False)
    assert len(keep) == 6 and keep.ties_dropped == 0
    missing = write_pairs(tmp_path / "m.parquet", n=2, drop_column="jpg_1")
    with pytest.raises(DataError, match=r"missing column\(s\) jpg_1; found: caption, jpg_0, label_0"):
        PreferenceDataset(str(missing), resolution=16)
    with pytest.raises(DataError, match="no such file or folder"):
        PreferenceDataset(str(tmp_path / "nope.parquet"), resolution=16)


def test_winner_is_ordered_first(tmp_path):
    from visalign.data.pairs import PreferenceDataset

    path = write_pairs(tmp_path / "p.parquet", n=2, labels=[0, 1])
    ds = PreferenceDataset(str(path), resolution=32)
    # row 0 has label_0 = 0: jpg_1 (the taller image, crop offset 4) must come first
    assert ds[0]["crop_top_left"].tolist() == [4.0, 0.0] and ds[1]["crop_top_left"].tolist() == [0.0, 0.0]


from visalign.objectives.diffusion_dpo import DiffusionDPO  # noqa: E402
from visalign.registry import METHODS  # noqa: E402


@METHODS.register("test_nan_dpo")
class NaNAtSteps(DiffusionDPO):
    """Diffusion-DPO whose loss is NaN on chosen calls (tests the safety net)."""

    calls = 0

    def __init__(self, beta: float = 5000.0, nan_calls: list[int] = ()):
        super().__init__(beta)
        self.nan_calls = set(nan_calls)

    def __call__(self, backbone, batch):
        out = super().__call__(backbone, batch)
        NaNAtSteps.calls += 1
        if NaNAtSteps.calls in self.nan_calls:
            out.loss = out.loss * float("nan")
        return out


def test_nonfinite_loss_stops_at_the_first_by_default(tiny_dir, pairs, tmp_path):
    NaNAtSteps.calls = 0
    cfg = _cfg(tiny_dir("pixel"), pairs, tmp_path / "a", "pixel",
               ["objective=test_nan_dpo", "objective.nan_calls=[3]", "train.steps=4", "train.save_every=2"])
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite.*step-0000002.*on_nonfinite=skip"):
        train(cfg)
    assert NaNAtSteps.calls == 3 and not (tmp_path / "a" / "lora").exists()
    assert not (tmp_path / "a" / "checkpoints" / "step-0000004").exists()


def test_nonfinite_skip_counts_and_stops_after_k(tiny_dir, pairs, tmp_path, caplog):
    NaNAtSteps.calls = 0
    cfg = _cfg(tiny_dir("pixel"), pairs, tmp_path / "a", "pixel",
               ["objective=test_nan_dpo", "objective.nan_calls=[2]", "train.steps=3", "train.on_nonfinite=skip"])
    summary = train(cfg)
    assert summary["steps"] == 3 and NaNAtSteps.calls == 4  # one skipped update, redone
    assert summary["nonfinite_skipped"] == 1 and "non-finite" in caplog.text
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 1]
    NaNAtSteps.calls = 0
    cfg = _cfg(tiny_dir("pixel"), pairs, tmp_path / "b", "pixel",
               ["objective=test_nan_dpo", "objective.nan_calls=[3, 4, 5]", "train.steps=6",
                "train.max_nonfinite=3", "train.save_every=2", "train.on_nonfinite=skip"])
    with pytest.raises(NonFiniteError, match=r"3 consecutive non-finite or empty steps.*step-0000002"):
        train(cfg)
    assert not (tmp_path / "b" / "lora").exists()


@pytest.mark.parametrize("family", ["sd15", "pixel"])
def test_cache_gives_the_same_loss_and_skips_encoders(tiny_dir, tmp_path, family):
    from visalign.data.cache import CachedDataset, build_cache, cache_dir_for, is_complete
    from visalign.data.pairs import PreferenceDataset
    from visalign.objectives.diffusion_dpo import DiffusionDPO
    from visalign.train.build import build_backbone

    cfg = _cfg(tiny_dir(family), write_pairs(tmp_path / "p.parquet", n=6, labels=[1, 0, 1, 0, 1, 0]),
               tmp_path / "run", family)
    bb = build_backbone(cfg.model)
    ds = PreferenceDataset(str(cfg.data.path), resolution=bb.resolution)
    path = cache_dir_for(ds, bb, str(tmp_path / "cache"))
    build_cache(bb, ds, path, batch_rows=4)
    assert is_complete(path)
    cached = CachedDataset(path, ds)
    method = DiffusionDPO(beta=5000.0)
    idx = [0, 3, 5]
    torch.manual_seed(123)
    plain = method(bb, ds.collate([ds[i] for i in idx]))
    torch.manual_seed(123)
    fast = method(bb, cached.collate([cached[i] for i in idx]))
    assert torch.allclose(plain.loss, fast.loss, rtol=1e-4, atol=1e-5)
    for k in ("err_w", "err_l", "ref_err_w", "ref_err_l"):
        assert plain.metrics[k] == pytest.approx(fast.metrics[k], rel=1e-4, abs=1e-6)
    # a training run from the complete cache builds the backbone without VAE and text encoders
    slim = build_backbone(cfg.model, load_encoders=False)
    assert slim.text_encoder is None and getattr(slim, "vae", None) is None
    assert cache_dir_for(ds, slim, str(tmp_path / "cache")) == path
    torch.manual_seed(123)
    again = method(slim, cached.collate([cached[i] for i in idx]))
    assert torch.allclose(again.loss, fast.loss, atol=1e-6)


def test_cache_builders_sharing_a_folder_never_see_each_others_files(tiny_dir, tmp_path, monkeypatch):
    """Two runs of a sweep building one cache at once: each writes a private staging folder; the first to
    finish publishes, the second finds the cache complete and succeeds; a stale half-built folder is replaced."""
    import visalign.data.cache as cache
    from visalign.data.pairs import PreferenceDataset
    from visalign.train.build import build_backbone

    cfg = _cfg(tiny_dir("pixel"), write_pairs(tmp_path / "p.parquet", n=6, labels=[1, 0, 1, 0, 1, 0]),
               tmp_path / "run", "pixel")
    bb = build_backbone(cfg.model)
    ds = PreferenceDataset(str(cfg.data.path), resolution=bb.resolution)
    path = cache.cache_dir_for(ds, bb, str(tmp_path / "cache"))
    path.mkdir(parents=True)
    (path / "shard-00000.safetensors").write_bytes(b"half-written by a killed build")

    encode, seen = cache._encode_into, []

    def racing_encode(backbone, dataset, staging, batch_rows):
        encode(backbone, dataset, staging, batch_rows)
        seen.append(staging)
        if len(seen) == 1:  # the other run finishes first, while this one is about to publish
            cache.build_cache(backbone, dataset, path, batch_rows)

    monkeypatch.setattr(cache, "_encode_into", racing_encode)
    cache.build_cache(bb, ds, path, batch_rows=4)
    assert len(seen) == 2 and seen[0] != seen[1] and seen[0].parent == path.parent
    assert cache.is_complete(path)
    assert len(cache.CachedDataset(path, ds)) == len(ds)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no staging folder left behind


def _save_random_lora(bb, out) -> None:
    """A rank-4, alpha-2 LoRA with random up-projections (a fresh LoRA is a no-op), saved in diffusers format."""
    from visalign.models.lora import LoraSpec, add_lora, save_lora

    add_lora(bb, LoraSpec(rank=4, alpha=2.0))
    with torch.no_grad():
        for n, p in bb.unwrapped().named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    save_lora(bb, out)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_export_kohya_keeps_alpha_and_loads_in_diffusers(tiny_dir, tmp_path, family):
    import diffusers

    from visalign.models.export import export_kohya
    from visalign.models.unet import SDBackbone, SDXLBackbone

    _save_random_lora((SDBackbone if family == "sd15" else SDXLBackbone)(str(tiny_dir(family))), tmp_path / "lora")
    out = export_kohya(tmp_path / "lora", tmp_path / "kohya.safetensors")
    k = load_file(out)
    assert all(key.startswith("lora_unet_") for key in k)
    alphas = [v for key, v in k.items() if key.endswith(".alpha")]
    assert alphas and all(float(a) == 2.0 for a in alphas)
    assert len([x for x in k if x.endswith("lora_down.weight")]) == len(alphas)
    cls = diffusers.StableDiffusionPipeline if family == "sd15" else diffusers.StableDiffusionXLPipeline
    pipe = cls.from_pretrained(tiny_dir(family))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = pipe("a cat", num_inference_steps=2, output_type="pt", generator=gen()).images
    pipe.load_lora_weights(tmp_path / "lora")
    a = pipe("a cat", num_inference_steps=2, output_type="pt", generator=gen()).images
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors")
    b = pipe("a cat", num_inference_steps=2, output_type="pt", generator=gen()).images
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(plain, a, atol=1e-4)  # the adapter does change the output


def test_export_kohya_for_sd3_uses_comfyui_keys_and_round_trips(tiny_dir, tmp_path):
    import diffusers

    from visalign.models.export import export_kohya, kohya_to_diffusers
    from visalign.models.flow import FlowBackbone

    _save_random_lora(FlowBackbone(str(tiny_dir("sd3")), max_sequence_length=8), tmp_path / "lora")
    k = load_file(export_kohya(tmp_path / "lora", tmp_path / "kohya.safetensors"))
    assert k and all(key.startswith("lora_transformer_transformer_blocks_") for key in k)
    assert all(float(v) == 2.0 for key, v in k.items() if key.endswith(".alpha"))
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(tiny_dir("sd3"), text_encoder_3=None, tokenizer_3=None)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    run = lambda: pipe("a cat", num_inference_steps=2, output_type="pt", generator=gen(),  # noqa: E731
                       max_sequence_length=8).images
    plain = run()
    pipe.load_lora_weights(tmp_path / "lora")
    a = run()
    pipe.unload_lora_weights()
    names = [n for n, _ in pipe.transformer.named_modules()]
    pipe.load_lora_weights(kohya_to_diffusers(k, names))
    b = run()
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(plain, a, atol=1e-4)


def test_validation_grids_tensorboard_and_ema(tiny_dir, pairs, tmp_path):
    out = tmp_path / "run"
    summary = _cli_train(tiny_dir("pixel"), pairs, out, "pixel", [
        "train.steps=4", "train.save_every=2", "train.tracker=tensorboard", "train.ema_decay=0.5",
        "train.validation_every=2", "train.validation_prompts=[a photo of a red circle, a photo of two squares]"])
    assert (out / "samples" / "step-0000002.png").exists() and (out / "samples" / "step-0000004.png").exists()
    assert list((out / "logs").rglob("events.out.tfevents*"))
    assert (out / "checkpoints" / "step-0000002" / "ema.safetensors").exists()
    plain = _cli_train(tiny_dir("pixel"), pairs, tmp_path / "plain", "pixel", ["train.steps=4"])
    assert summary["weights_sha256"] != plain["weights_sha256"]  # the EMA weights were saved
    card = (out / "README.md").read_text()
    assert "diffusion_dpo" in card and "base_model:" in card


from visalign.registry import REWARDS  # noqa: E402


@REWARDS.register("test_scripted_gold")
class ScriptedGold:
    """Returns a fixed sequence of scores, one per evaluation (a constructed run with a known best)."""

    name, version = "test_scripted_gold", "1"
    schedule = [0.1, 0.2, 0.9, 0.4, 0.3]
    calls = 0

    def __call__(self, images, prompts):
        value = ScriptedGold.schedule[ScriptedGold.calls % len(ScriptedGold.schedule)]
        ScriptedGold.calls += 1
        return torch.full((len(images),), value)


def test_gold_guardrail_selects_the_best_checkpoint(tiny_dir, pairs, tmp_path):
    ScriptedGold.calls = 0
    out = tmp_path / "run"
    summary = _cli_train(tiny_dir("pixel"), pairs, out, "pixel", [
        "train.steps=10", "train.gold_reward=test_scripted_gold", "train.proxy_reward=shapes",
        "train.gold_every=2", "train.gold_samples=4", "train.gold_prompts=shapes:eval", "train.select_best=gold",
        "train.sample_steps=2"])
    rows = [json.loads(x) for x in (out / "gold.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10] and all("proxy" in r for r in rows)
    assert summary["best_step"] == 6 and summary["best_gold"] == pytest.approx(0.9)
    # the final LoRA is the step-6 one: equal to a run that simply stops at step 6
    _cli_train(tiny_dir("pixel"), pairs, tmp_path / "short", "pixel", ["train.steps=6"])
    a = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "short" / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    from visalign.registry import ConfigError

    with pytest.raises(ConfigError, match="select_best=gold needs"):
        load_config("shapes", [], ["train.select_best=gold"])


def test_prompt_dropout_changes_what_the_model_sees_with_the_cache_on(tiny_dir, pairs, tmp_path):
    from visalign.data.cache import CachedDataset, build_cache, cache_dir_for, drop_prompts
    from visalign.data.pairs import PreferenceDataset
    from visalign.models.pixel import PixelBackbone
    from visalign.objectives.diffusion_dpo import DiffusionDPO

    bb = PixelBackbone(str(tiny_dir("pixel")))
    ds = PreferenceDataset(str(pairs), resolution=bb.resolution)
    path = build_cache(bb, ds, cache_dir_for(ds, bb, str(tmp_path / "cache")))
    cached = CachedDataset(path, ds)
    empty = bb.encode_prompts([""]).tensors["hidden"]
    method = DiffusionDPO()

    def errors_seen(rate):
        batch = cached.collate([cached[i] for i in range(4)])
        torch.manual_seed(0)
        drop_prompts(batch, rate, cached.empty_text)
        torch.manual_seed(1)
        return batch, method(bb, batch).metrics["err_w"]  # policy = reference here: the loss is log 2 either way

    kept, err_kept = errors_seen(0.0)
    dropped, err_dropped = errors_seen(1.0)
    assert dropped.prompts == [""] * 4 and torch.equal(dropped.cond.tensors["hidden"], empty.expand(4, -1, -1))
    assert not torch.equal(kept.cond.tensors["hidden"], dropped.cond.tensors["hidden"])
    assert err_kept != err_dropped


@pytest.mark.parametrize("mode,steps,compiled", [("off", 5000, False), ("on", 2, True), ("auto", 2, False),
                                                 ("auto", 6000, True)])
def test_compile_is_applied_by_the_documented_rule(tiny_dir, pairs, tmp_path, monkeypatch, mode, steps, compiled):
    """train.compile: on, off, or auto (on from compile_min_steps up); the loop wraps the denoiser in
    torch.compile exactly then (the compiler itself stands in here: its start-up is the bench's business)."""
    calls = []

    def fake_compile(module, **kw):
        calls.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = _cfg(tiny_dir("pixel"), pairs, tmp_path / "run", extra=[f"train.compile={mode}", f"train.steps={steps}"])
    assert cfg.train.compiles() == compiled
    cfg.train.steps = 1  # the rule is decided on the configured length; run one step of it
    if compiled or mode == "off":
        cfg.train.compile = "on" if compiled else "off"
    train(cfg)
    assert len(calls) == int(compiled)


def test_bad_compile_value_is_one_line(tiny_dir, pairs, tmp_path):
    from visalign.registry import ConfigError

    with pytest.raises(ConfigError, match="train.compile='yes': expected auto, on or off"):
        _cfg(tiny_dir("pixel"), pairs, tmp_path / "run", extra=["train.compile=yes"])


def test_every_lora_checkpoint_holds_an_adapter_equal_to_a_run_stopped_there(tiny_dir, pairs, tmp_path):
    """step-N/lora is the adapter after N steps: a 2-step run's final LoRA (independent run, same seed)."""
    model = tiny_dir("pixel")
    _cli_train(model, pairs, tmp_path / "long", extra=["train.steps=4", "train.save_every=2"])
    _cli_train(model, pairs, tmp_path / "short", extra=["train.steps=2"])
    mid = load_file(tmp_path / "long" / "checkpoints" / "step-0000002" / "lora" / "pytorch_lora_weights.safetensors")
    short = load_file(tmp_path / "short" / "lora" / "pytorch_lora_weights.safetensors")
    final = load_file(tmp_path / "long" / "lora" / "pytorch_lora_weights.safetensors")
    assert mid.keys() == short.keys() and mid
    assert all(torch.equal(mid[k], short[k]) for k in mid)
    assert any(not torch.equal(mid[k], final[k]) for k in mid)  # the checkpoint is not the end of the run
