"""OFS-DPO's fast-slow chasing on iterative on-policy DPO: the chasing terms against scalar formulas, the
roles, the twin LoRA module on every tiny family, and runs from the CLI that resume exactly."""

import json
import math

import pytest
import torch
from helpers import Redness, family_of, family_variants, finetune_args  # noqa: F401  (Redness: the test_redness reward)
from safetensors.torch import load_file

from visalign.objectives.fast_slow import Roles, chasing_losses


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("fast_leads", [True, False])
def test_chasing_terms_and_their_gradients_match_the_scalar_formulas(fast_leads):
    alpha, hf, hs = 0.3, 0.7, -0.4
    h_fast = torch.tensor([hf], requires_grad=True)
    h_slow = torch.tensor([hs], requires_grad=True)
    for_fast, for_slow = chasing_losses(h_fast, h_slow, fast_leads, alpha)
    lead, chase = (hf, hs) if fast_leads else (hs, hf)
    l_fs = _softplus(-(lead - chase))  # −log σ(h_F − h_S)
    want_fast, want_slow = (alpha * l_fs, -alpha * l_fs) if fast_leads else (-alpha * l_fs, alpha * l_fs)
    assert for_fast.item() == pytest.approx(want_fast, rel=1e-6)
    assert for_slow.item() == pytest.approx(want_slow, rel=1e-6)
    # each module's term moves only that module: d/dh_F of −log σ(h_F − h_S) = −σ(−(h_F − h_S))
    (for_fast + for_slow).sum().backward()
    sig = 1 / (1 + math.exp(lead - chase))
    lead_grad, chase_grad = -alpha * sig, -alpha * sig  # the leader pushes its h up; so does the chaser
    assert h_fast.grad.item() == pytest.approx(lead_grad if fast_leads else chase_grad, rel=1e-6)
    assert h_slow.grad.item() == pytest.approx(chase_grad if fast_leads else lead_grad, rel=1e-6)


def test_roles_go_to_the_lower_dpo_loss_every_k_calls_and_round_trip():
    roles = Roles(every=3)
    for f, s in ((0.7, 0.6), (0.7, 0.6)):
        roles.observe(f, s)
    assert roles.fast_leads  # not re-dealt before the third call
    roles.observe(0.7, 0.6)
    assert not roles.fast_leads and roles.count == 0
    roles.observe(0.5, 0.9)
    copy = Roles(every=3)
    copy.load_state_dict(json.loads(json.dumps(roles.state_dict())))
    assert copy == roles
    for r in (roles, copy):
        r.observe(0.5, 0.9)
        r.observe(0.5, 0.9)
    assert roles.fast_leads and copy == roles


@pytest.mark.parametrize("family", family_variants())
def test_twin_adapter_starts_identical_runs_only_inside_its_context_and_is_not_saved(tiny_dir, tmp_path, family):
    from visalign.models.lora import LoraSpec, add_lora, lora_state_dict

    _, cls = family_of(family)
    bb = cls(str(tiny_dir(family)), **cls.tiny_kwargs)
    add_lora(bb, LoraSpec(init="true"))
    saved_before = set(lora_state_dict(bb))
    twin = bb.add_twin_adapter("slow")
    model = bb.unwrapped()
    assert twin and all(p.requires_grad for p in twin)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    x0 = torch.randn(2, *bb.sample_shape, generator=torch.Generator().manual_seed(0))
    noised = bb.noise(x0, generator=torch.Generator().manual_seed(1))
    cond = bb.encode_prompts(["a red circle", "two squares"])
    with torch.no_grad():
        fast = bb.error(noised, cond)
        with bb.adapter("slow"):
            same = bb.error(noised, cond)
        for p in twin:  # move the slow module only
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
        with bb.adapter("slow"):
            moved = bb.error(noised, cond)
        again = bb.error(noised, cond)
    assert torch.allclose(fast, same, atol=1e-6) and torch.equal(fast, again)
    assert not torch.allclose(fast, moved, atol=1e-6)
    assert all(p.requires_grad for p in twin)  # the switch back leaves both modules trainable
    with bb.reference():  # adapters off, then on again: peft's switch alone would freeze the twin
        pass
    with bb.adapter("slow"):
        bb.error(noised, cond).sum().backward()
    with bb.reference():  # between forward and backward too
        pass
    assert all(p.requires_grad for p in twin) and all(p.grad is not None for p in twin)
    assert set(lora_state_dict(bb)) == saved_before  # the policy's LoRA file holds the fast module only


def _argv(tiny_dir, family, out, *extra):
    return ["finetune", *finetune_args(family, tiny_dir(family)), "data.path=shapes:train",
            "objective.name=online_dpo", "objective.prompts_per_round=2", "objective.round_steps=2",
            "objective.steps=3", "objective.reward=test_redness", "objective.samples_per_prompt=3",
            "objective.min_margin=0", "objective.fast_slow=true", "objective.chase_every=2",
            "objective.ofs_alpha=0.5", f"train.output_dir={out}", "train.batch_size=2", "train.lr=1e-2",
            "train.log_every=1", "train.threads=1", "train.tracker=none", "train.mixed_precision=no", *extra]


@pytest.mark.parametrize("family", family_variants())
def test_fast_slow_online_dpo_trains_both_modules_from_the_cli(tiny_dir, tmp_path, family):
    from visalign.cli import main

    out = tmp_path / "run"
    assert main(_argv(tiny_dir, family, out, "train.steps=3", "train.save_every=2")) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and {"dpo_fast", "dpo_slow", "fast_leads"} <= set(r)
                                  for r in rows)
    state = load_file(out / "checkpoints" / "step-0000002" / "model.safetensors")
    slow = {k: v for k, v in state.items() if ".slow." in k}
    fast = {k.replace(".slow.", ".default."): v for k, v in slow.items()}
    assert slow and any(not torch.equal(v, state[k]) for k, v in fast.items())  # different rates: apart
    # both learnt: each LoRA's B starts at 0 (the reference's adapters-off switch must not freeze the twin)
    assert all(v.abs().sum() > 0 for k, v in slow.items() if "lora_B" in k)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_fast_slow_resumes_exactly_and_needs_lora(tiny_dir, tmp_path, capsys):
    from visalign.cli import main

    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(_argv(tiny_dir, "pixel", whole, "train.steps=4", "train.save_every=0")) == 0
    assert main(_argv(tiny_dir, "pixel", split, "train.steps=4", "train.save_every=2")) == 0
    import shutil

    shutil.rmtree(split / "lora")
    (split / "summary.json").unlink()
    # resume from step 2: the slow module, its optimizer group and who leads come back
    assert main(_argv(tiny_dir, "pixel", split, "train.steps=4", "train.save_every=2", "train.resume=latest")) == 0
    a = load_file(whole / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(split / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    capsys.readouterr()
    assert main(_argv(tiny_dir, "pixel", tmp_path / "full", "train.steps=1", "lora.enabled=false")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "objective.fast_slow=true needs lora.enabled=true" in err[0]


def test_fast_slow_under_accelerate_launch_keeps_both_ranks_identical(tiny_dir, tmp_path):
    """Two CPU processes (gloo): both modules' gradients are averaged, so the ranks end with equal weights."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = str(Path(sys.executable).parent / "accelerate")
    argv = [a for a in _argv(tiny_dir, "pixel", tmp_path / "ddp", "train.steps=3", "train.save_every=0")
            if a != "objective.reward=test_redness"] + ["objective.reward=shapes"]  # a registered reward
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", "29733", "-m", "visalign", *argv]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    digests = [line.split('"')[3] for line in r.stdout.splitlines() if '"weights_sha256"' in line]
    assert len(digests) == 2 and digests[0] == digests[1]
