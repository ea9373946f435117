"""f-DPO, ADPO, β-DPO and Curry-DPO stages against independent scalar formulas, and through the trainer."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import write_pairs

from visalign.config import load_config
from visalign.objectives import losses as heads
from visalign.objectives.pair_heads import build_head
from visalign.train.loop import train

R_W = torch.tensor([-3.0, -0.4, 0.0, 0.2, 1.5, 6.0], dtype=torch.float64)
R_L = torch.tensor([0.5, -0.9, 0.3, -2.0, 1.0, -1.0], dtype=torch.float64)


def lsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def test_fdpo_reverse_kl_is_sigmoid_dpo_for_any_beta():
    for beta in (0.3, 1.0, 7.0):
        got = heads.fdpo_loss(R_W, R_L, "reverse_kl", beta=beta)
        assert torch.allclose(got, heads.sigmoid_loss(R_W - R_L), atol=1e-12)


@pytest.mark.parametrize("divergence,link", [
    ("forward_kl", lambda u, a: -math.exp(-u)),
    ("js", lambda u, a: math.log(2 * math.exp(u) / (1 + math.exp(u))) - math.log(2)),  # f′ of JS, less log 2
    ("alpha", lambda u, a: (1 - math.exp(-a * u)) / a - 1 / a),  # f′(ratio) = (1 − ratio^−α)/α, less a constant
])
@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_fdpo_matches_closed_forms(divergence, link, beta):
    alpha = 0.3
    got = heads.fdpo_loss(R_W, R_L, divergence, alpha=alpha, beta=beta)
    ref = [-lsig(beta * (link(w / beta, alpha) - link(l_ / beta, alpha))) for w, l_ in zip(R_W.tolist(), R_L.tolist())]
    assert torch.allclose(got, torch.tensor(ref, dtype=torch.float64), atol=1e-10)


def test_fdpo_alpha_limits_are_reverse_and_forward_kl():
    small = heads.fdpo_loss(R_W, R_L, "alpha", alpha=1e-7)
    assert torch.allclose(small, heads.fdpo_loss(R_W, R_L, "reverse_kl"), atol=1e-5)
    assert torch.allclose(heads.fdpo_loss(R_W, R_L, "alpha", alpha=1.0), heads.fdpo_loss(R_W, R_L, "forward_kl"))


def test_fdpo_head_from_config_and_bad_divergence():
    head = build_head({"name": "fdpo", "divergence": "forward_kl"})
    p = torch.ones(6, dtype=torch.float64)
    assert torch.allclose(head.pair_loss(R_W, R_L, p), heads.fdpo_loss(R_W, R_L, "forward_kl"))
    with pytest.raises(ValueError, match="objective.head.divergence"):
        build_head({"name": "fdpo", "divergence": "hellinger"})


def test_adpo_is_kl_to_the_soft_target_over_lists():
    r = torch.tensor([[0.3, -1.2, 2.0, 0.1]], dtype=torch.float64)
    s = torch.tensor([[0.9, 0.1, 0.5, 0.4]], dtype=torch.float64)
    tau, tq = 0.7, 0.2
    q = [math.exp(v / tq) for v in s[0].tolist()]
    q = [v / sum(q) for v in q]
    m = [math.exp(v / tau) for v in r[0].tolist()]
    m = [v / sum(m) for v in m]
    kl = sum(a * math.log(a / b) for a, b in zip(q, m))
    head = build_head({"name": "adpo", "tau": tau, "target_tau": tq})
    assert head.list_loss(r, s).item() == pytest.approx(kl, abs=1e-12)
    assert heads.adpo_loss(r, torch.tensor([q], dtype=torch.float64), tau).item() >= 0


def test_adpo_on_a_pair_with_a_hard_label_is_dpo_at_beta_over_tau():
    head = build_head({"name": "adpo", "tau": 0.5, "target": "label"})
    got = head.pair_loss(R_W, R_L, torch.ones(6, dtype=torch.float64))
    assert torch.allclose(got, heads.sigmoid_loss((R_W - R_L) / 0.5), atol=1e-12)
    soft = head.pair_loss(R_W, R_L, torch.full((6,), 0.5, dtype=torch.float64))
    h = ((R_W - R_L) / 0.5).tolist()
    ref = [0.5 * math.log(0.5 / math.exp(lsig(x))) + 0.5 * math.log(0.5 / math.exp(lsig(-x))) for x in h]
    assert torch.allclose(soft, torch.tensor(ref, dtype=torch.float64), atol=1e-12)


def test_beta_dpo_scale_filter_and_state_by_hand():
    torch.manual_seed(0)
    head = build_head({"name": "beta_dpo", "alpha": 0.5, "keep": 0.5, "momentum": 0.9})
    h1 = torch.tensor([0.0, 1.0, 2.0, 3.0])
    loss1 = head(h1, torch.ones(4))
    assert head.m0 == pytest.approx(1.5) and head.sigma == pytest.approx(float(h1.std()))
    assert int((loss1 > 0).sum()) == 2  # half the batch kept, the rest masked
    h2 = torch.tensor([4.0, 5.0, 6.0, 7.0])
    loss2 = head(h2, torch.ones(4))
    m0 = 0.9 * 1.5 + 0.1 * 5.5
    assert head.m0 == pytest.approx(m0)
    kept = loss2 > 0
    scale = max(0.05, 1 + 0.5 * (float(h2[kept].mean()) - m0))
    assert head.scale == pytest.approx(scale)
    ref = torch.tensor([-lsig(scale * x) * 2 for x in h2.tolist()])  # kept pairs, mean over the kept half
    assert torch.allclose(loss2[kept], ref[kept], atol=1e-6)
    state = json.loads(json.dumps(head.state_dict()))
    fresh = build_head({"name": "beta_dpo"})
    fresh.load_state_dict(state)
    assert fresh.m0 == head.m0 and fresh.sigma == head.sigma
    # the filter prefers margins near M0: far-off pairs get a vanishing keep probability
    p = heads.gaussian_keep_probs(torch.tensor([0.0, 0.1, 10.0]), 0.0, 1.0)
    assert p[2] < 1e-20 and p[0] > p[1]


def test_curriculum_stages_cut_easy_to_hard():
    from visalign.objectives.margins import curriculum_stages

    margin = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2])
    stages = curriculum_stages(margin, 3)
    assert [s.tolist() for s in stages] == [[1, 4], [2, 3], [5, 0]]


def test_stream_serves_each_stage_its_own_rows():
    from visalign.train.build import BatchStream

    class Rows:
        def __len__(self):
            return 9

    stages = [np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([6, 7, 8])]
    stream = BatchStream(Rows(), 2, seed=0, stages=stages, stage_micro_steps=4)
    for micro in range(14):
        want = set(stages[min(micro // 4, 2)].tolist())
        assert set(stream.indices(micro)) <= want
    first_epoch = stream.indices(0) + stream.indices(1)[:1]
    assert sorted(first_epoch) == [0, 1, 2]  # a shuffled epoch of the stage, not a fixed order


def _cfg(tmp_path, model, data, extra):
    return load_config("shapes", [], [f"model.path={model}", f"data.path={data}", f"train.output_dir={tmp_path}",
                                      "train.steps=4", "train.batch_size=2", "train.threads=1", "train.tracker=none",
                                      "train.log_every=1", "train.mixed_precision=no", *extra])


@pytest.mark.parametrize("head", [["objective.head=fdpo", "objective.head.divergence=js"],
                                  ["objective.head=adpo"], ["objective.head=beta_dpo"]])
def test_new_heads_train_and_log(tiny_dir, tmp_path, head):
    data = write_pairs(tmp_path / "p.parquet", n=4, labels=[1, 1, 1, 1], scores=True)
    summary = train(_cfg(tmp_path / "run", tiny_dir("pixel"), data, ["train.save_every=0", *head]))
    assert summary["steps"] == 4
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)
    if "objective.head=beta_dpo" in head:
        assert all("beta_scale" in r for r in rows)


def test_curry_stages_reset_the_reference_and_resume_exactly(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_pairs(tmp_path / "p.parquet", n=8, labels=[1] * 8, scores=True)
    curry = ["data.curriculum=true", "data.curriculum_stages=2", "train.lr=1e-3", "objective.head=beta_dpo",
             "train.save_every=3"]
    run = tmp_path / "run"
    assert train(_cfg(run, tiny_dir("pixel"), data, curry))["steps"] == 4
    lora = run / "lora" / "pytorch_lora_weights.safetensors"
    uninterrupted = load_file(lora)
    ckpt = run / "checkpoints" / "step-0000003"
    assert (ckpt / "reference.safetensors").exists()  # stage 2 began at step 2: its reference is saved
    assert json.loads((ckpt / "visalign_state.json").read_text())["method"]["head"]["m0"] is not None
    lora.unlink()
    train(_cfg(run, tiny_dir("pixel"), data, [*curry, f"train.resume={ckpt}"]))
    resumed = load_file(lora)
    for k in uninterrupted:
        assert torch.allclose(uninterrupted[k], resumed[k], atol=1e-6, rtol=0), k


def test_curry_reference_is_the_policy_at_the_stage_start(tiny_dir, tmp_path):
    data = write_pairs(tmp_path / "p.parquet", n=8, labels=[1] * 8, scores=True)
    stages = ["data.curriculum=true", "data.curriculum_stages=2", "train.lr=1e-2", "train.save_every=0"]
    train(_cfg(tmp_path / "run", tiny_dir("pixel"), data, stages))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # at a stage start the reference equals the policy, so the implicit margin is exactly 0 there
    assert rows[2]["logit_mean"] == 0.0 and rows[0]["logit_mean"] == 0.0
    assert rows[1]["logit_mean"] != 0.0
    with pytest.raises(Exception, match="data.curriculum_stages=2 needs data.curriculum=true"):
        _cfg(tmp_path / "bad", tiny_dir("pixel"), data, ["data.curriculum_stages=2"])
