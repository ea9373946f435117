"""DCT-AdamW against an independent DCT and a hand-written projected Adam step; state size; a full fine-tune."""

import math

import numpy as np
import pytest
import torch

from visalign.train.dct_adamw import DCTAdamW, best_columns, dct_basis, state_bytes


def test_dct_basis_is_orthonormal_dct_ii():
    n = 12
    q = dct_basis(n, torch.float64).numpy()
    assert np.allclose(q.T @ q, np.eye(n), atol=1e-12)
    x = np.random.default_rng(0).normal(size=n)
    # DCT-II by its defining sum, orthonormal scaling: X_k = c_k Σ_i x_i cos(π(2i+1)k/2n)
    ref = [(math.sqrt(1 / n) if k == 0 else math.sqrt(2 / n))
           * sum(x[i] * math.cos(math.pi * (2 * i + 1) * k / (2 * n)) for i in range(n)) for k in range(n)]
    assert np.allclose(x @ q, ref, atol=1e-12)


def test_best_columns_pick_the_gradients_own_frequencies():
    q = dct_basis(16, torch.float64)
    g = torch.randn(4, 2, dtype=torch.float64) @ q[:, [3, 11]].T  # G lives in columns 3 and 11
    assert best_columns(g, q, 2, right=True).tolist() == [3, 11]
    assert best_columns(g.T, q, 2, right=False).tolist() == [3, 11]


def test_two_steps_match_a_hand_written_projected_adam():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 10, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = DCTAdamW([w, b], lr=0.1, rank=2, update_gap=1, weight_decay=0.01, eps=1e-8)
    w_ref, b_ref = w.detach().clone(), b.detach().clone()
    q = dct_basis(10, torch.float64)
    m = v = torch.zeros(3, 2, dtype=torch.float64)
    mb = vb = torch.zeros(3, dtype=torch.float64)
    for t in (1, 2):
        gw, gb = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        energy = [float(torch.linalg.norm(gw @ q[:, j])) for j in range(10)]
        idx = sorted(sorted(range(10), key=lambda j: -energy[j])[:2])
        qr = q[:, idx]
        g = gw @ qr
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        u = (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        w_ref = w_ref * (1 - 0.1 * 0.01) - 0.1 * (u @ qr.T)
        mb, vb = 0.9 * mb + 0.1 * gb, 0.999 * vb + 0.001 * gb * gb
        ub = (mb / (1 - 0.9 ** t)) / ((vb / (1 - 0.999 ** t)).sqrt() + 1e-8)
        b_ref = b_ref * (1 - 0.1 * 0.01) - 0.1 * ub
        assert torch.allclose(w.detach(), w_ref, atol=1e-12) and torch.allclose(b.detach(), b_ref, atol=1e-12)
    assert opt.state[w]["exp_avg"].shape == (3, 2) and opt.state[w]["indices"].numel() == 2


def test_state_is_rank_r_per_matrix():
    layer = torch.nn.Linear(256, 128)
    for opt_cls, kw in ((torch.optim.AdamW, {}), (DCTAdamW, {"rank": 16})):
        opt = opt_cls(layer.parameters(), lr=1e-3, **kw)
        layer(torch.randn(4, 256)).sum().backward()
        opt.step()
        if opt_cls is DCTAdamW:
            low = state_bytes(opt)
    full = 2 * 4 * (256 * 128 + 128)
    assert low == 2 * 4 * (128 * 16 + 128) + 16 * 8  # moments in 128x16, the bias in full, 16 int64 indices
    assert low / full < 0.15


def test_full_fine_tune_with_dct_adamw(tiny_dir, tmp_path):
    from helpers import write_pairs

    from visalign.config import load_config
    from visalign.train.loop import train

    data = write_pairs(tmp_path / "p.parquet", n=4, labels=[1, 1, 1, 1])
    cfg = load_config("shapes", [], [f"model.path={tiny_dir('pixel')}", f"data.path={data}",
                                     f"train.output_dir={tmp_path / 'run'}", "train.steps=3", "train.batch_size=2",
                                     "train.threads=1", "train.tracker=none", "train.save_every=0",
                                     "lora.enabled=false", "train.optimizer=dct_adamw", "train.optimizer_rank=4"])
    summary = train(cfg)
    assert summary["steps"] == 3 and (tmp_path / "run" / "model").exists()
    with pytest.raises(Exception, match="train.optimizer_rank"):
        load_config("shapes", [], ["train.optimizer_rank=0"])
