"""ShapesWorld's rater: each term against hand-built renders, and the Bradley-Terry labeller by simulation."""

import math

import pytest
import torch

from visalign.rewards.labels import bradley_terry_labels, expected_agreement, temperature_for_agreement
from visalign.worlds.shapes.rater import RaterReward
from visalign.worlds.shapes.render import ShapeObject, draw


def _img(*objects: ShapeObject, size: int = 32) -> torch.Tensor:
    return torch.from_numpy(draw(list(objects), size)).permute(2, 0, 1).float() / 255


def _square(x0, y0, side, color="red"):
    return ShapeObject("square", color, (x0, y0, x0 + side, y0 + side))


def test_size_term_by_hand():
    rater = RaterReward()
    small, big = _img(_square(12, 12, 7)), _img(_square(10, 10, 11))  # the renderer's smallest and largest
    assert rater.terms(small, "a photo of a square")["size"] == pytest.approx(0.0)
    assert rater.terms(big, "a photo of a square")["size"] == pytest.approx(1.0)
    mid = _img(_square(11, 11, 9))
    assert rater.terms(mid, "a photo of a square")["size"] == pytest.approx((9 / 32 - 7 / 32) / (4 / 32))


def test_margin_and_centre_terms_by_hand():
    rater = RaterReward()
    corner = rater.terms(_img(_square(1, 1, 9)), "a photo of a square")
    assert corner["margin"] == pytest.approx(1 / 4)  # a 1 px gap / (32 / 8)
    centred = rater.terms(_img(_square(11, 11, 10)), "a photo of a square")
    assert centred["margin"] == 1.0 and centred["centre"] == pytest.approx(1.0)
    # the corner square's centre (5.5, 5.5) is 10.5·√2 px from the image centre
    assert corner["centre"] == pytest.approx(1 - 10.5 * math.sqrt(2) / 16, abs=1e-6)


def test_a_bigger_render_scores_higher_and_a_missing_object_lower():
    rater = RaterReward()
    prompt = "a photo of a red square and a blue circle"
    circle = ShapeObject("circle", "blue", (18, 10, 27, 19))
    small = _img(_square(5, 11, 7), circle)
    big = _img(_square(4, 10, 10), circle)
    missing = _img(_square(4, 10, 10))
    s_small, s_big, s_missing = rater(torch.stack([small, big, missing]), [prompt] * 3).tolist()
    assert s_big > s_small > s_missing
    assert rater.terms(missing, prompt)["prompt"] == pytest.approx(2 / 4)  # the circle and its colour unmet
    empty = rater.terms(_img(), prompt)
    assert all(v == 0 for v in empty.values())


def test_score_is_the_stated_weighted_sum():
    rater = RaterReward(prompt=0.4, size=0.3, margin=0.1, crisp=0.1, centre=0.1)
    img, prompt = _img(_square(3, 8, 9)), "a photo of a green square"  # the colour is wrong: P = 1/2
    t = rater.terms(img, prompt)
    assert t["prompt"] == pytest.approx(0.5)
    expected = 0.4 * t["prompt"] + 0.3 * t["size"] + 0.1 * (t["margin"] + t["crisp"] + t["centre"])
    assert rater(img[None], [prompt]).item() == pytest.approx(expected, abs=1e-6)


def test_rater_refuses_foreign_captions_before_scoring():
    from visalign.worlds.shapes.captions import CaptionError

    with pytest.raises(CaptionError, match="a photo of a cat"):
        RaterReward().check_prompts(["a photo of a circle", "a photo of a cat"])


def test_bradley_terry_agreement_by_simulation():
    g = torch.Generator().manual_seed(0)
    gaps = torch.rand(4000, generator=g) * 0.3
    t = temperature_for_agreement(gaps, 0.68)
    assert expected_agreement(gaps, t) == pytest.approx(0.68, abs=1e-4)
    a, b = gaps, torch.zeros_like(gaps)
    rates = []
    for seed in range(5):
        labels = bradley_terry_labels(a, b, t, torch.Generator().manual_seed(100 + seed))
        rates.append(labels.mean().item())  # a is the noiseless choice everywhere: agreement = share of 1s
    assert sum(rates) / len(rates) == pytest.approx(0.68, abs=0.01)
    # two independent labellers agree with each other on E[p² + (1 − p)²] of pairs
    p = torch.sigmoid(gaps / t)
    l1 = bradley_terry_labels(a, b, t, torch.Generator().manual_seed(10))
    l2 = bradley_terry_labels(a, b, t, torch.Generator().manual_seed(11))
    assert (l1 == l2).float().mean().item() == pytest.approx((p ** 2 + (1 - p) ** 2).mean().item(), abs=0.02)


def test_noiseless_labels_follow_the_scores_and_ties_are_half():
    labels = bradley_terry_labels(torch.tensor([0.9, 0.1, 0.5]), torch.tensor([0.2, 0.3, 0.5]), 0.0)
    assert labels.tolist() == [1.0, 0.0, 0.5]


def test_pairs_labelled_with_bradley_terry_noise():
    from visalign.data.make_dataset import pairs_from_list

    row = {"prompt": "p", "images": [b"a", b"b", b"c", b"d"], "scores": [0.9, 0.5, 0.45, 0.1]}
    assert {p["label_0"] for p in pairs_from_list(row, "all")} == {1.0}
    coin = [pairs_from_list(row, "all", label_temperature=1e6, generator=torch.Generator().manual_seed(seed))
            for seed in range(200)]
    labels = [p["label_0"] for pairs in coin for p in pairs]
    assert set(labels) == {0.0, 1.0} and abs(sum(labels) / len(labels) - 0.5) < 0.05  # T → ∞: a coin
    again = pairs_from_list(row, "all", label_temperature=0.1, generator=torch.Generator().manual_seed(3))
    assert again == pairs_from_list(row, "all", label_temperature=0.1, generator=torch.Generator().manual_seed(3))


def test_rater_winrate_and_labelled_make_dataset_from_the_cli(tiny_dir, tmp_path, capsys):
    import json

    import pyarrow.parquet as pq

    from visalign.cli import main

    model = str(tiny_dir("pixel"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a red circle\na photo of two squares\na photo of a square and a circle\n")
    assert main(["eval", "winrate", "--model", model, "--baseline", model, "--reward", "rater", "--prompts",
                 str(prompts), "--steps", "2", "--out", str(tmp_path / "w")]) == 0
    result = json.loads((tmp_path / "w" / "winrate.json").read_text())
    assert result["win_rate"] == 0.5 and result["ties"] == 6  # the same model: every pair ties
    assert set(result["terms"]) == {"prompt", "size", "margin", "crisp", "centre"}
    assert all(v["change"] == 0 for v in result["terms"].values())
    assert "paired change" in capsys.readouterr().out
    out = tmp_path / "ds"
    assert main(["make-dataset", "--prompts", str(prompts), "--model", f"pixel={model}", "--reward", "rater",
                 "--images-per-prompt", "4", "--steps", "2", "--pairs", "all", "--normalise", "none",
                 "--label-temperature", "0.05", "--out", str(out)]) == 0
    pairs = [r for f in sorted((out / "pairs").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert pairs and all(r["score_0"] > r["score_1"] and r["label_0"] in (0.0, 1.0) for r in pairs)
