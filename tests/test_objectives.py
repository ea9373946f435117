"""Every objective against an independent scalar implementation, identities, gradients, and a DPO example."""

import math
import random

import pytest
import torch

from visalign import objectives as O


def lsig(x: float) -> float:
    """log σ(x), stable, in plain Python."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return math.exp(lsig(x))


H = torch.tensor([-800.0, -30.0, -2.5, -0.3, 0.0, 0.7, 3.0, 45.0, 900.0], dtype=torch.float64)


def close(t: torch.Tensor, ref: list[float], tol=1e-9):
    assert torch.isfinite(t).all()
    assert torch.allclose(t, torch.tensor(ref, dtype=t.dtype), rtol=tol, atol=tol), (t, ref)


def test_implicit_reward_and_logit_match_scalar_formula():
    rng = random.Random(0)
    vals = [[rng.uniform(0, 2) for _ in range(4)] for _ in range(6)]
    ew, el, rw, rl = (torch.tensor([v[i] for v in vals], dtype=torch.float64) for i in range(4))
    beta = 5000.0
    close(O.implicit_reward(ew, rw, beta), [-(beta / 2) * (v[0] - v[2]) for v in vals])
    close(O.dpo_logit(ew, el, rw, rl, beta), [-(beta / 2) * ((v[0] - v[2]) - (v[1] - v[3])) for v in vals], 1e-7)


@pytest.mark.parametrize("name,fn,ref", [
    ("sigmoid", lambda h: O.sigmoid_loss(h), lambda h: -lsig(h)),
    ("hinge", lambda h: O.hinge_loss(h), lambda h: max(0.0, 1 - h)),
    ("ipo", lambda h: O.ipo_loss(h, 0.25), lambda h: (h - 1 / (2 * 0.25)) ** 2),
    ("conservative", lambda h: O.conservative_loss(h, 0.2), lambda h: -0.8 * lsig(h) - 0.2 * lsig(-h)),
    ("robust", lambda h: O.robust_loss(h, 0.3), lambda h: (-0.7 * lsig(h) + 0.3 * lsig(-h)) / 0.4),
    ("soft_label", lambda h: O.soft_label_loss(h, 0.8), lambda h: -0.8 * lsig(h) - 0.2 * lsig(-h)),
    ("smpo", lambda h: O.smpo_loss(h, 0.7, 10.0), lambda h: -lsig(10 * 0.4 * h)),
])
def test_pairwise_heads_match_scalar_loop(name, fn, ref):
    out = fn(H)
    close(out, [ref(float(h)) for h in H], tol=1e-9)


def test_kto_matches_scalar_loop():
    r = torch.tensor([-50.0, -1.0, 0.0, 0.4, 2.0, 60.0], dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False, True, False])
    z = 0.3
    out = O.kto_loss(r, desirable, z, lambda_d=1.5, lambda_u=0.7)
    ref = [(1.5 * (1 - sig(float(ri) - z)) if d else 0.7 * (1 - sig(z - float(ri)))) for ri, d in zip(r, desirable)]
    close(out, ref)


def scalar_ranked(r: list[float], gt: list[float]) -> float:
    k = len(r)
    order = sorted(range(k), key=lambda i: -r[i])
    tau = {i: pos + 1 for pos, i in enumerate(order)}
    psi = [sum(1 for j in range(k) if gt[j] < gt[i]) for i in range(k)]
    gain = [2.0 ** p - 1 for p in psi]
    num = den = 0.0
    for i in range(k):
        for j in range(k):
            if gt[i] > gt[j]:
                w = abs(gain[i] - gain[j]) * abs(1 / math.log2(1 + tau[i]) - 1 / math.log2(1 + tau[j]))
                num += w * -lsig(r[i] - r[j])
                den += w
    return num / den if den > 0 else 0.0


def test_ranked_loss_matches_scalar_loop():
    rng = random.Random(1)
    rows_r, rows_gt = [], []
    for _ in range(8):
        k = 5
        rows_r.append([rng.uniform(-40, 40) for _ in range(k)])
        rows_gt.append([float(rng.randint(0, 3)) for _ in range(k)])  # ties inside lists
    rows_r.append([0.1, 0.2, 0.3, 0.4, 0.5])
    rows_gt.append([1.0] * 5)  # all tied: 0
    r = torch.tensor(rows_r, dtype=torch.float64)
    gt = torch.tensor(rows_gt, dtype=torch.float64)
    close(O.ranked_loss(r, gt), [scalar_ranked(a, b) for a, b in zip(rows_r, rows_gt)])


def test_listwise_ddo_d3po_mapo_match_scalar_loops():
    r = torch.tensor([[1.0, -2.0, 0.5], [30.0, -40.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    ref = []
    for ri, qi in zip(r.tolist(), q.tolist()):
        m = max(ri)
        lse = m + math.log(sum(math.exp(x - m) for x in ri))
        ref.append(-sum(qk * (rk - lse) for qk, rk in zip(qi, ri)))
    close(O.listwise_loss(r, q), ref)

    real, fake = O.ddo_loss(H, H.flip(0), alpha=0.5)
    close(real, [-lsig(float(h)) for h in H])
    close(fake, [-0.5 * lsig(-float(h)) for h in H.flip(0)])

    lw, rw = torch.tensor([0.0, -0.3, 0.05, 2.0], dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    ll, rl = torch.tensor([0.02, 0.3, -0.05, -2.0], dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    out = O.d3po_loss(lw, rw, ll, rl, beta=0.1, clip_eps=0.1)
    clip = lambda x: min(max(x, math.log(0.9)), math.log(1.1))  # noqa: E731
    close(out, [-lsig(0.1 * (clip(a) - clip(b))) for a, b in zip(lw.tolist(), ll.tolist())])

    ew = torch.tensor([0.0, 0.1, 0.5, 2.0], dtype=torch.float64)
    el = torch.tensor([0.2, 0.1, 0.3, 5.0], dtype=torch.float64)

    def f(e):
        return 1.0 if e == 0 else 0.5 * e / math.expm1(0.5 * e)

    close(O.mapo_loss(ew, el, beta=0.1, gamma=0.5, T=1000.0),
          [a - 0.1 * lsig(1000 * (f(a) - f(b))) for a, b in zip(ew.tolist(), el.tolist())])


def test_gradcheck_float64():
    h = (torch.randn(6, dtype=torch.float64) * 3).requires_grad_()
    p = torch.rand(6, dtype=torch.float64) * 0.5 + 0.5
    for fn in (O.sigmoid_loss, lambda x: O.ipo_loss(x, 0.3), lambda x: O.conservative_loss(x, 0.1),
               lambda x: O.robust_loss(x, 0.2), lambda x: O.soft_label_loss(x, p), lambda x: O.smpo_loss(x, p),
               lambda x: O.kto_loss(x, torch.arange(6) % 2 == 0, 0.2), lambda x: O.ddo_loss(x, -x)[1],
               lambda x: O.listwise_loss(x.view(2, 3), torch.softmax(p.view(2, 3), -1)),
               lambda x: O.ranked_loss(x.view(2, 3), torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]],
                                                                  dtype=torch.float64))):
        assert torch.autograd.gradcheck(fn, (h,))
    e = (torch.rand(4, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: O.mapo_loss(a, a.flip(0) * 1.3, 0.1, 0.5, 10.0), (e,))
    lp = (torch.randn(4, dtype=torch.float64) * 0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: O.d3po_loss(a, torch.zeros_like(a), -a, torch.zeros_like(a), 1.0, 0.1),
                                    (lp,))
    ref = torch.rand(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: O.dpo_logit(a, a * 2, ref, ref * 0.5, 7.0), (e,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dtypes_and_large_logits_are_finite(dtype):
    h = H.to(dtype)
    for out in (O.sigmoid_loss(h), O.conservative_loss(h, 0.1), O.robust_loss(h, 0.2), O.soft_label_loss(h, 0.7),
                O.smpo_loss(h, 0.9), O.ipo_loss(h, 0.1), O.hinge_loss(h), *O.ddo_loss(h, h)):
        assert out.dtype == dtype and torch.isfinite(out).all()
    r = torch.tensor([[1e4, -1e4, 3.0]], dtype=dtype)
    assert torch.isfinite(O.ranked_loss(r, torch.tensor([[2.0, 1.0, 0.0]], dtype=dtype))).all()
    assert torch.isfinite(O.listwise_loss(r, torch.tensor([[0.0, 1.0, 0.0]], dtype=dtype))).all()


def test_identities():
    h = torch.linspace(-20, 20, 41, dtype=torch.float64)
    s = O.sigmoid_loss(h)
    assert torch.allclose(O.conservative_loss(h, 0.0), s)
    assert torch.allclose(O.robust_loss(h, 0.0), s)
    assert torch.allclose(O.soft_label_loss(h, 1.0), s)
    gain = 10.0
    p = 0.5 * (1 + 1 / gain)  # 2p - 1 = 1/gain
    assert torch.allclose(O.smpo_loss(h, p, gain), s)
    rw, rl = torch.randn(7, dtype=torch.float64) * 5, torch.randn(7, dtype=torch.float64) * 5
    pair = torch.stack([rw, rl], 1)
    assert torch.allclose(O.ranked_loss(pair, torch.tensor([[1.0, 0.0]] * 7, dtype=torch.float64)),
                          O.sigmoid_loss(rw - rl))
    assert torch.allclose(O.listwise_loss(pair, torch.tensor([[1.0, 0.0]] * 7, dtype=torch.float64)),
                          O.sigmoid_loss(rw - rl))


@pytest.mark.parametrize("head", [O.sigmoid_loss, O.hinge_loss, lambda h: O.ipo_loss(h, 0.5),
                                  lambda h: O.conservative_loss(h, 0.1), lambda h: O.robust_loss(h, 0.2),
                                  lambda h: O.soft_label_loss(h, 0.9), lambda h: O.smpo_loss(h, 0.8)])
def test_minimising_lowers_winner_error_relative_to_loser(head):
    err_w = torch.tensor([0.30], dtype=torch.float64, requires_grad=True)
    err_l = torch.tensor([0.30], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.30], dtype=torch.float64)
    head(O.dpo_logit(err_w, err_l, ref, ref, beta=1.0)).sum().backward()
    # gradient descent moves err_w down and err_l up
    assert err_w.grad.item() > 0 and err_l.grad.item() < 0


def test_diffusion_dpo_hand_example_beta_5000():
    # numbers as the reference code computes them: inside = -0.5 * beta * (model_diff - ref_diff)
    err_w, err_l, ref_w, ref_l = 0.1000, 0.1200, 0.1002, 0.1199
    model_diff = err_w - err_l  # -0.02
    ref_diff = ref_w - ref_l  # -0.0197
    inside = -0.5 * 5000 * (model_diff - ref_diff)  # = 0.75
    assert abs(inside - 0.75) < 1e-9
    expected_loss = math.log1p(math.exp(-0.75))  # -log σ(0.75) = log(1 + e^-0.75) = 0.38687
    h = O.dpo_logit(*(torch.tensor([v], dtype=torch.float64) for v in (err_w, err_l, ref_w, ref_l)), beta=5000)
    assert abs(h.item() - 0.75) < 1e-9
    assert abs(O.sigmoid_loss(h).item() - expected_loss) < 1e-12
    assert abs(expected_loss - 0.38687) < 1e-4
    # the diffusers SD1.5 script's beta_dpo=2500 without the 1/2 is the same number
    assert abs(2500 * (ref_diff - model_diff) - h.item()) < 1e-9


def test_margin_and_difficulty_weights_and_curriculum():
    m = torch.tensor([0.0, 0.1, 1.0, -3.0])
    w = O.margin_weights(m, 1.0)
    ref = [math.tanh(abs(x)) for x in m.tolist()]
    ref = [x / (sum(ref) / 4) for x in ref]
    assert torch.allclose(w, torch.tensor(ref), atol=1e-6)
    d = O.difficulty_weights(m, 1.0)
    refd = [2 * sig(-abs(x)) for x in m.tolist()]
    refd = [x / (sum(refd) / 4) for x in refd]
    assert torch.allclose(d, torch.tensor(refd), atol=1e-6)
    assert d[0] > d[1] > d[2] > d[3]  # hard pairs weigh more
    assert w[0] < w[1] < w[2] < w[3]
    assert O.curriculum_order(m).tolist() == [3, 2, 1, 0]
    assert O.curriculum_order(torch.tensor([0.5, 0.5, 2.0])).tolist() == [2, 0, 1]  # stable on ties


def test_win_rate_by_hand_and_ci_coverage_by_simulation():
    from visalign.eval.winrate import win_rate

    r = win_rate(torch.tensor([3.0, 1.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 2.0, 0.0]))
    assert r["win_rate"] == pytest.approx((1 + 0 + 0.5 + 1) / 4) and (r["wins"], r["ties"], r["losses"]) == (2, 1, 1)
    w = [1, 0, 0.5, 1]
    sd = (sum((x - 0.625) ** 2 for x in w) / 3) ** 0.5
    assert r["ci_high"] == pytest.approx(min(1, 0.625 + 1.959964 * sd / 2))
    gen = torch.Generator().manual_seed(0)
    covered, trials, p_true = 0, 400, 0.62
    for _ in range(trials):
        a = torch.rand(300, generator=gen)
        b = torch.where(torch.rand(300, generator=gen) < p_true, a - 1, a + 1)  # a wins with prob p_true
        res = win_rate(a, b)
        covered += res["ci_low"] <= p_true <= res["ci_high"]
    assert 0.92 <= covered / trials <= 0.98
