"""Methods beyond Diffusion-DPO: RankDPO on lists, InPO and SmPO on inverted latents, KTO and MaPO runs."""

import json
import math

import pytest
import torch
from helpers import write_pairs

from visalign.config import load_config
from visalign.errors import UserError
from visalign.models.flow import FlowBackbone
from visalign.models.pixel import PixelBackbone
from visalign.models.unet import SDBackbone
from visalign.objectives.smpo import smoothed_preference
from visalign.registry import ConfigError
from visalign.train.build import build_method
from visalign.train.loop import train


def test_per_image_inversion_targets_and_reparametrisation(tiny_dir):
    bb = SDBackbone(str(tiny_dir("sd15")))
    x0 = torch.randn(3, *bb.sample_shape)
    cond = bb.encode_prompts(["a cat", "a dog", "a car"])
    grid = bb.inversion_grid(10)
    assert grid.tolist() == sorted(grid.tolist()) and int(grid[0]) == 1
    until = torch.tensor([int(grid[0]), int(grid[4]), int(grid[-1])])
    x_t, t = bb.invert(x0, cond, steps=10, until=until)
    assert t.tolist() == until.tolist()
    # one image alone reaches the same latent as inside the batch
    x1, t1 = bb.invert(x0[1:2], cond[1:2], steps=10, until=int(grid[4]))
    assert torch.allclose(x1, x_t[1:2], atol=1e-5) and t1.tolist() == [int(grid[4])]
    eps_hat = bb.eps_from_xt(x0, x_t, t)
    assert torch.allclose(bb.noise(x0, t=t, eps=eps_hat).x_t, x_t, atol=1e-4)
    r1, _ = bb.invert(x0, cond, steps=10, until=until, renoise=1)
    assert not torch.allclose(r1[2], x_t[2])  # ReNoise changes the high-noise latents
    with pytest.raises(ValueError, match="below the first grid timestep"):
        bb.invert(x0, cond, steps=10, until=0)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_inversion_path_holds_every_grid_point(tiny_dir, family):
    bb = SDBackbone(str(tiny_dir("sd15"))) if family == "sd15" else FlowBackbone(str(tiny_dir("sd3")),
                                                                                 max_sequence_length=8)
    x0 = torch.randn(2, *bb.sample_shape)
    cond = bb.encode_prompts(["a cat", "a dog"])
    grid = bb.inversion_grid(5)
    path: list = []
    bb.invert(x0, cond, steps=5, path=path)
    assert len(path) == len(grid)
    for j in (0, 2, len(grid) - 1):
        x_j, _ = bb.invert(x0, cond, steps=5, until=grid[j].expand(2))
        assert torch.allclose(path[j], x_j, atol=1e-5)


def test_flow_inversion_per_image_and_reparametrisation(tiny_dir):
    bb = FlowBackbone(str(tiny_dir("sd3")), max_sequence_length=8)
    x0 = torch.randn(2, *bb.sample_shape)
    cond = bb.encode_prompts(["a cat", "a dog"])
    grid = bb.inversion_grid(6)
    x_t, t = bb.invert(x0, cond, steps=6, until=torch.stack([grid[1], grid[3]]))
    assert torch.allclose(t, torch.stack([grid[1], grid[3]]).float(), atol=1e-3)
    eps_hat = bb.eps_from_xt(x0, x_t, t)
    assert torch.allclose(bb.noise(x0, t=t, eps=eps_hat).x_t, x_t, atol=1e-4)


def test_smoothed_preference_by_hand():
    s = torch.tensor([[0.9, 0.1], [0.5, 0.4]])
    p = smoothed_preference(s, "none", 1.0)
    assert torch.allclose(p, torch.tensor([1 / (1 + math.exp(-0.8)), 1 / (1 + math.exp(-0.1))]))
    pm = smoothed_preference(s, "minmax", 0.5)
    lo, hi = 0.1, 0.9
    ref = [1 / (1 + math.exp(-((a - lo) / (hi - lo) - (b - lo) / (hi - lo)) / 0.5)) for a, b in s.tolist()]
    assert torch.allclose(pm, torch.tensor(ref))
    assert torch.all(p >= 0.5)


def _run(tmp_path, model, data, objective, extra=()):
    cfg = load_config("shapes", [], [f"model.path={model}", f"data.path={data}", f"train.output_dir={tmp_path}",
                                     "train.steps=2", "train.batch_size=2", "train.threads=1", "train.tracker=none",
                                     "train.save_every=0", "train.log_every=1", *objective, *extra])
    return train(cfg)


@pytest.mark.parametrize("objective", [["objective=inpo", "objective.steps=5"],
                                       ["objective=smpo", "objective.steps=4"],
                                       ["objective=kto"], ["objective=mapo"],
                                       ["objective.head=ipo"], ["objective.head=robust"]])
def test_pair_methods_train(tiny_dir, tmp_path, objective):
    data = write_pairs(tmp_path / "p.parquet", n=4, labels=[1, 0, 1, 0], scores=True)
    summary = _run(tmp_path / "run", tiny_dir("pixel"), data, objective)
    assert summary["steps"] == 2
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_rankdpo_trains_on_ranked_lists(tiny_dir, tmp_path):
    from visalign.data.make_dataset import MakeDatasetConfig, make_dataset

    out = tmp_path / "lists"
    make_dataset(MakeDatasetConfig(prompts="shapes:train", models=[f"pixel={tiny_dir('pixel')}"],
                                   images_per_prompt=3, out=str(out), steps=2, max_prompts=4, shard_size=4,
                                   threads=1), progress=False)
    summary = _run(tmp_path / "run", tiny_dir("pixel"), out, ["objective=rankdpo", "data.format=lists"])
    assert summary["steps"] == 2
    from visalign.registry import ConfigError

    with pytest.raises(ConfigError, match="trains on lists; set data.format=lists"):
        _run(tmp_path / "bad", tiny_dir("pixel"), out, ["objective=rankdpo"])


def test_dpo_raises_implicit_accuracy_on_held_out_pairs(tiny_dir, tmp_path):
    """Winners are clean renders, losers the same scenes with noise; held-out pairs use other scenes."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from visalign.data.pairs import PreferenceDataset
    from visalign.objectives.base import denoising_errors, model_inputs
    from visalign.objectives.implicit import dpo_logit
    from visalign.worlds.shapes.render import render, sample_records

    def rows(seed, n):
        out = []
        rng = np.random.default_rng(seed)
        for i, r in enumerate(sample_records(n, seed)):
            img, _ = render(r, seed * 1000 + i)
            img = np.asarray(Image.fromarray(img).resize((16, 16), Image.NEAREST))
            noisy = np.clip(img + rng.normal(0, 60, img.shape), 0, 255).astype(np.uint8)
            enc = []
            for a in (img, noisy):
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, format="PNG")
                enc.append(buf.getvalue())
            out.append({"caption": r["prompt"], "jpg_0": enc[0], "jpg_1": enc[1], "label_0": 1.0})
        return out

    pq.write_table(pa.Table.from_pylist(rows(1, 64)), tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows(2, 64)), tmp_path / "held.parquet")
    model = tiny_dir("pixel")

    def held_out_acc(tuned=None):
        bb = PixelBackbone(str(model))
        if tuned:
            bb.freeze_reference_copy()
            bb.denoiser = PixelBackbone(tuned).denoiser
        ds = PreferenceDataset(str(tmp_path / "held.parquet"), resolution=16)
        batch = ds.collate([ds[i] for i in range(len(ds))])
        torch.manual_seed(0)
        accs = []
        with torch.no_grad():
            for _ in range(4):
                x0, cond = model_inputs(bb, batch)
                err, ref = denoising_errors(bb, x0, cond)
                accs.append((dpo_logit(err[:, 0], err[:, 1], ref[:, 0], ref[:, 1], 1000.0) > 0).float().mean())
        return float(torch.stack(accs).mean())

    summary = _run(tmp_path / "run", model, tmp_path / "train.parquet", [],
                   ["train.steps=60", "train.batch_size=8", "train.lr=5e-4", "lora.enabled=false",
                    "objective.beta=1000"])
    acc = held_out_acc(summary["model"])
    assert acc > 0.75, acc


from visalign.registry import REWARDS  # noqa: E402


@REWARDS.register("test_brightness")
class Brightness:
    """Mean pixel value (a tie-free toy reward for random models)."""

    name, version = "test_brightness", "1"

    def __call__(self, images, prompts):
        return images.float().mean((1, 2, 3))


def test_d3po_round_log_probs_equal_step_logprob_and_training_runs(tiny_dir, tmp_path):
    from visalign.objectives.d3po import D3PO

    bb = PixelBackbone(str(tiny_dir("pixel")))
    m = D3PO(steps=3, prompts_per_round=6, guidance=2.0, reward="test_brightness")
    items = m.make_round(bb, ["a photo of a red circle", "a photo of two squares"], torch.Generator().manual_seed(0))
    assert items["reuse_ref"] and items["traj"].shape[1:3] == (2, 4)
    n = len(items["prompts"])
    assert n == 6
    if n:
        cond = bb.encode_prompts(items["prompts"])
        uncond = bb.encode_prompts([""] * n)
        s = 1
        with torch.no_grad():
            lp = bb.step_logprob(items["traj"][:, 0, s], items["traj"][:, 0, s + 1], items["timesteps"][s], cond,
                                 steps=3, eta=1.0, uncond=uncond, guidance=2.0)
        assert torch.allclose(lp, items["logp"][:, 0, s], atol=1e-4)
    summary = _run(tmp_path / "run", tiny_dir("pixel"), "shapes:train",
                   ["objective=d3po", "objective.steps=3", "objective.prompts_per_round=8",
                    "objective.round_steps=2", "objective.reward=test_brightness"], ["train.steps=4"])
    assert summary["steps"] == 4


def test_d3po_samples_at_the_runs_guidance_unless_its_config_says_otherwise(tiny_dir):
    from visalign.config import Component
    from visalign.objectives.d3po import D3PO
    from visalign.train.build import build_method

    run = build_method(Component("d3po", {"reward": "test_brightness"}), guidance=1.5)
    assert run.guidance == 1.5
    own = build_method(Component("d3po", {"reward": "test_brightness", "guidance": 4.0}), guidance=1.5)
    assert own.guidance == 4.0
    assert build_method(Component("ddo", {}), guidance=1.5).guidance == 1.0  # DDO samples unguided by design
    with pytest.raises(ValueError, match="guidance is unset"):
        D3PO(steps=2, prompts_per_round=2, reward="test_brightness").make_round(
            PixelBackbone(str(tiny_dir("pixel"))), ["a photo of a red circle"], torch.Generator().manual_seed(0))


def test_ddo_real_and_fake_terms_push_rewards_apart(tiny_dir):
    from visalign.models.lora import LoraSpec, add_lora
    from visalign.objectives.ddo import DDO
    from visalign.objectives.implicit import implicit_reward
    from visalign.objectives.losses import ddo_loss

    bb = PixelBackbone(str(tiny_dir("pixel")))
    add_lora(bb, LoraSpec(rank=4, alpha=4.0))
    m = DDO(beta=1000.0, prompts_per_round=4, steps=2)
    items = m.make_round(bb, ["a photo of a red circle"], torch.Generator().manual_seed(0))
    batch = m.take(items, torch.arange(4))
    params = [p for p in bb.unwrapped().parameters() if p.requires_grad]

    def rewards():
        torch.manual_seed(0)
        from visalign.objectives.base import model_inputs

        x0, cond = model_inputs(bb, batch)
        noised = bb.noise(x0.flatten(0, 1))
        err = bb.error(noised, cond.repeat_interleave(2)).view(4, 2)
        with torch.no_grad(), bb.reference():
            ref = bb.error(noised, cond.repeat_interleave(2)).view(4, 2)
        return implicit_reward(err, ref, 1000.0)

    for term, sign in ((0, +1), (1, -1)):
        r0 = rewards().detach()
        r = rewards()
        loss = ddo_loss(r[:, 0], r[:, 1])[term].mean()
        loss.backward()
        opt = torch.optim.SGD(params, lr=1e-2)
        opt.step()
        opt.zero_grad()
        r1 = rewards().detach()
        moved = (r1[:, term] - r0[:, term]).mean()
        assert sign * moved > 0, (term, moved)


def test_ddo_trains_in_self_play_rounds(tiny_dir, tmp_path):
    summary = _run(tmp_path / "run", tiny_dir("pixel"), "shapes:train",
                   ["objective=ddo", "objective.prompts_per_round=4", "objective.round_steps=2", "objective.steps=2",
                    "objective.beta=1000"], ["train.steps=4"])
    assert summary["steps"] == 4


def _captioned_folder(path, captions, size=32):
    """An image folder with a metadata.jsonl (datasets' imagefolder layout): one flat-coloured image per caption."""
    import json

    from PIL import Image

    path.mkdir(parents=True)
    rows = []
    for i, text in enumerate(captions):
        Image.new("RGB", (size + 8, size), (40 * i % 255, 200, 90)).save(path / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return path


def test_ddo_takes_real_images_from_a_captioned_folder_on_a_latent_model(tiny_dir, tmp_path):
    """DDO is not tied to ShapesWorld: its real data are a folder's images of the run's own prompts (SD1.5)."""
    from helpers import finetune_args

    from visalign.cli import main
    from visalign.data.captioned import captioned_images

    folder = _captioned_folder(tmp_path / "real", ["a red cat", "a blue dog", "a red cat"])
    imgs = captioned_images(str(folder), ["a blue dog", "a red cat"], torch.Generator().manual_seed(0), 16)
    assert imgs.shape == (2, 3, 16, 16) and 0 <= imgs.min() and imgs.max() <= 1
    assert torch.allclose(imgs[0, 1], torch.full((16, 16), 200 / 255), atol=1e-6)  # the dog's image, resized
    out = tmp_path / "run"
    main(["finetune", *finetune_args("sd15", tiny_dir("sd15")), "objective=ddo", f"objective.real=images:{folder}",
          f"data.path={folder}", "objective.prompts_per_round=2", "objective.round_steps=1", "objective.steps=2",
          f"train.output_dir={out}", "train.steps=2", "train.batch_size=2", "train.threads=1", "train.tracker=none",
          "train.save_every=0", "train.mixed_precision=no"])
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    with pytest.raises(UserError, match="objective.real: no image in .* is captioned 'a green cow'"):
        captioned_images(str(folder), ["a green cow"], torch.Generator(), 16, "objective.real")
    with pytest.raises(ConfigError, match="objective.real='nowhere:x'"):
        build_method(load_config("shapes", [], ["objective=ddo", "objective.real=nowhere:x"]).objective)


def test_inpo_cached_reference_inversions_are_reused_and_exact(tiny_dir):
    from visalign.objectives.inpo import InPO
    from visalign.types import PreferenceBatch

    bb = PixelBackbone(str(tiny_dir("pixel")))
    images = torch.rand(3, 2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    batch = PreferenceBatch(prompts=["a photo of a red circle"] * 3, label=torch.ones(3), images=images)
    fresh = InPO(steps=2, eta=0.0, inversion_model="reference")
    cached = InPO(steps=2, eta=0.0, inversion_model="reference", cache_inversions=True)
    calls = {"n": 0}
    original = bb.invert

    def counting(*a, **kw):
        calls["n"] += 1
        return original(*a, **kw)

    bb.invert = counting
    for i in range(6):
        torch.manual_seed(i)
        a = fresh(bb, batch)
        torch.manual_seed(i)
        b = cached(bb, batch)
        assert torch.allclose(a.loss, b.loss, atol=1e-6)
    # fresh inverts at every step; cached inverts each of the 6 images once, up the whole grid
    assert calls["n"] == 6 + 1 and len(cached.cache) == 6
