"""Held-out implicit accuracy: pair construction and the averaged DPO logit against a hand calculation."""

import contextlib

import pytest
import torch

from visalign.eval.implicit_accuracy import implicit_accuracy, pairs_from_results
from visalign.models.backbone import Noised


class AnalyticBackbone:
    """Errors known in closed form: e_ref(x) = mean(x), e_policy(x) = 2·mean(x) (independent of t and ε)."""

    def __init__(self):
        self.in_reference = False

    def encode_images(self, images, generator=None):
        return images

    def encode_prompts(self, prompts, image_meta=None):
        return torch.zeros(len(prompts), 1)

    def sample_timesteps(self, n, generator=None):
        return torch.randint(0, 1000, (n,))

    def noise(self, x0, t=None, eps=None, generator=None):
        return Noised(x_t=x0, t=t, target=torch.zeros_like(x0))

    def error(self, noised, cond):
        m = noised.x_t.flatten(1).mean(1)
        return m if self.in_reference else 2 * m

    @contextlib.contextmanager
    def reference(self):
        self.in_reference = True
        try:
            yield
        finally:
            self.in_reference = False


def test_pairs_from_results_orders_winner_first_and_respects_margin():
    img = {k: torch.full((3, 2, 2), float(k)) for k in range(4)}
    rows = [{"prompt": "a", "constraints": 1.0, "image": img[0]}, {"prompt": "a", "constraints": 0.5, "image": img[1]},
            {"prompt": "a", "constraints": 0.45, "image": img[2]}, {"prompt": "b", "constraints": 0.0, "image": img[3]}]
    pairs = pairs_from_results(rows, min_margin=0.15)
    # (1.0 vs 0.5), (1.0 vs 0.45); 0.5 vs 0.45 is below the margin; prompt b has one sample
    assert [(p, float(w[0, 0, 0]), float(lo[0, 0, 0])) for p, w, lo in pairs] == [("a", 0.0, 1.0), ("a", 0.0, 2.0)]


def test_implicit_accuracy_matches_the_closed_form():
    beta = 10.0
    # policy − reference error = mean(x), so h = −β/2·(mean(w) − mean(l))
    means = [(0.1, 0.5), (0.2, 0.3), (0.6, 0.4), (0.0, 0.9)]
    pairs = [("p", torch.full((3, 2, 2), w), torch.full((3, 2, 2), lo)) for w, lo in means]
    out = implicit_accuracy(AnalyticBackbone(), pairs, beta=beta, draws=3, batch_size=3)
    expected_h = [-beta / 2 * (w - lo) for w, lo in means]
    assert out["n"] == 4 and out["accuracy"] == pytest.approx(0.75)
    assert out["mean_h"] == pytest.approx(sum(expected_h) / 4, rel=1e-5)
    assert out["se"] == pytest.approx((0.75 * 0.25 / 4) ** 0.5)


def test_implicit_accuracy_of_the_base_is_zero_logit(tiny_dir):
    from visalign.models.pixel import PixelBackbone

    bb = PixelBackbone(str(tiny_dir("pixel")))
    g = torch.Generator().manual_seed(0)
    pairs = [("a photo of a red circle", torch.rand(3, 16, 16, generator=g), torch.rand(3, 16, 16, generator=g))
             for _ in range(3)]
    out = implicit_accuracy(bb, pairs, draws=2)
    assert out["mean_h"] == 0.0 and out["accuracy"] == 0.0  # policy = reference: no pair is ranked


def test_clustered_se_matches_a_hand_calculation_and_ignores_duplication():
    from visalign.eval.implicit_accuracy import clustered_se

    values, clusters = [1, 1, 0, 1, 0, 0], ["a", "a", "a", "b", "b", "c"]
    # by hand: mean 0.5; cluster sums of deviations a: 0.5, b: 0, c: -0.5; G = 3
    assert clustered_se(values, clusters) == pytest.approx((1.5 * (0.25 + 0 + 0.25)) ** 0.5 / 6)
    # singleton clusters: the binomial SE with the G/(G-1) correction
    p = 0.5
    assert clustered_se(values, range(6)) == pytest.approx((6 / 5 * p * (1 - p) / 6) ** 0.5)
    # copying every outcome within its own cluster adds no information: the SE must not shrink
    # (the binomial SE would shrink by sqrt(4))
    assert clustered_se(values * 4, clusters * 4) == pytest.approx(clustered_se(values, clusters))
    assert clustered_se([1, 0], ["a", "a"]) != clustered_se([1, 0], ["a", "a"])  # one cluster: nan


def test_implicit_accuracy_reports_the_se_clustered_by_prompt():
    beta = 10.0
    means = [(0.1, 0.5), (0.2, 0.3), (0.6, 0.4), (0.0, 0.9)]
    pairs = [(p, torch.full((3, 2, 2), w), torch.full((3, 2, 2), lo)) for p, (w, lo) in zip("aabb", means)]
    out = implicit_accuracy(AnalyticBackbone(), pairs, beta=beta, draws=1)
    # right: a, a, b (wrong), b; mean 0.75 -> deviation sums a: +0.5, b: -0.5; G = 2
    assert out["se_by_prompt"] == pytest.approx((2 * (0.25 + 0.25)) ** 0.5 / 4)
