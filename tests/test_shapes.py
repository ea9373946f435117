"""ShapesWorld: renderer, exact detector, GenEval rules, reward, prompt sets and tokenizer coverage."""

import random

import numpy as np
import pytest
import torch
from scipy import ndimage

from visalign.worlds.shapes.detector import detect, evaluate_objects, record_for_prompt, relative_position
from visalign.worlds.shapes.render import (
    ShapeObject,
    all_records,
    draw,
    prompt_records,
    read_metadata,
    render,
    sample_records,
    write_metadata,
)
from visalign.worlds.shapes.reward import ShapesReward
from visalign.worlds.shapes.vocab import COLORS, SHAPES, TASKS


def _key(objs):
    return sorted((o.shape, o.color, o.box) for o in objs)


def test_detector_exact_on_2000_clean_renders():
    records = sample_records(2000, seed=11)
    wrong = 0
    for i, r in enumerate(records):
        img, objs = render(r, seed=10_000 + i)
        det = detect(img)
        wrong += _key(det.objects) != _key(objs) or not evaluate_objects(det.objects, r)[0]
        assert det.clean == pytest.approx(1.0, abs=1e-6) or _key(det.objects) != _key(objs)
    assert wrong == 0


def test_detector_robust_to_noise_and_blur():
    records = sample_records(600, seed=5)
    rng = np.random.default_rng(0)
    ok = 0
    for i, r in enumerate(records):
        img, objs = render(r, seed=20_000 + i)
        x = img.astype(np.float32) / 255.0
        x = ndimage.gaussian_filter(x, sigma=(0.5, 0.5, 0))  # slight blur
        x = np.clip(x + rng.normal(0, 0.03, x.shape), 0, 1)
        det = detect(x.transpose(2, 0, 1))  # float CHW input path
        found = sorted((o.shape, o.color) for o in det.objects)
        ok += found == sorted((o.shape, o.color) for o in objs) and evaluate_objects(det.objects, r)[0]
    assert ok / len(records) >= 0.99


def _objs(*specs):
    return [ShapeObject(s, c, box) for s, c, box in specs]


def test_scorer_counting_exact_with_exclude():
    rec = record_for_prompt("a photo of three circles")
    three = _objs(("circle", "red", (1, 1, 8, 8)), ("circle", "blue", (12, 1, 19, 8)),
                  ("circle", "red", (1, 12, 8, 19)))
    four = three + _objs(("circle", "green", (20, 20, 27, 27)))
    two = three[:2]
    assert evaluate_objects(three, rec)[0]
    ok, frac, reasons = evaluate_objects(four, rec)
    assert not ok and "circle<4" in reasons[0] and frac == 0.5
    assert not evaluate_objects(two, rec)[0]


def test_scorer_colour_binding_and_swapped_colours():
    rec = record_for_prompt("a photo of a red circle and a blue triangle")
    right = _objs(("circle", "red", (1, 1, 9, 9)), ("triangle", "blue", (15, 15, 24, 24)))
    swapped = _objs(("circle", "blue", (1, 1, 9, 9)), ("triangle", "red", (15, 15, 24, 24)))
    assert evaluate_objects(right, rec)[0]
    ok, frac, _ = evaluate_objects(swapped, rec)
    assert not ok and frac == 0.5  # both objects present, both colours wrong
    colors = record_for_prompt("a photo of a green square")
    assert not evaluate_objects(_objs(("square", "yellow", (3, 3, 11, 11))), colors)[0]


def test_scorer_relative_position_with_margin():
    rec = record_for_prompt("a photo of a circle left of a square")
    assert rec["include"][1]["position"] == ["left of", 0]
    left = _objs(("square", "red", (20, 10, 28, 18)), ("circle", "blue", (2, 10, 10, 18)))
    right = _objs(("square", "red", (2, 10, 10, 18)), ("circle", "blue", (20, 10, 28, 18)))
    assert evaluate_objects(left, rec)[0]
    assert not evaluate_objects(right, rec)[0]
    # offsets inside the margin (0.1 x summed box sizes) count as no relation
    a = ShapeObject("circle", "red", (10, 10, 18, 18))
    b = ShapeObject("square", "red", (11, 10, 19, 18))
    assert relative_position(a, b) == set()
    diag = relative_position(ShapeObject("circle", "red", (0, 0, 8, 8)), ShapeObject("square", "red", (20, 20, 28, 28)))
    assert diag == {"left of", "above"}
    above = record_for_prompt("a photo of a triangle above a circle")
    assert not evaluate_objects(_objs(("circle", "red", (12, 2, 20, 10)), ("triangle", "red", (12, 20, 20, 28))),
                                above)[0]


def test_single_and_two_object_rules():
    single = record_for_prompt("a photo of a triangle")
    assert evaluate_objects(_objs(("triangle", "red", (1, 1, 9, 9)), ("circle", "red", (15, 15, 22, 22))), single)[0]
    assert not evaluate_objects(_objs(("square", "red", (1, 1, 9, 9))), single)[0]
    two = record_for_prompt("a photo of a circle and a square")
    assert not evaluate_objects(_objs(("circle", "red", (1, 1, 9, 9))), two)[0]


def test_reward_range_and_ranking():
    reward = ShapesReward()
    rec = record_for_prompt("a photo of a red circle and a blue triangle")
    good = draw(_objs(("circle", "red", (2, 2, 11, 11)), ("triangle", "blue", (16, 16, 26, 26))))
    half = draw(_objs(("circle", "blue", (2, 2, 11, 11)), ("triangle", "red", (16, 16, 26, 26))))
    blank = draw([])
    imgs = torch.from_numpy(np.stack([good, half, blank])).permute(0, 3, 1, 2).float() / 255
    s = reward(imgs, [rec["prompt"]] * 3)
    assert s[0] == pytest.approx(1.0) and 0.4 < s[1] < 0.6 and s[2] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="not a ShapesWorld caption"):
        reward(imgs[:1], ["a photo of a dragon"])


def test_prompt_sets_disjoint_cover_tasks_and_roundtrip(tmp_path):
    train, ev = prompt_records("train"), prompt_records("eval")
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in ev})
    assert len(train) + len(ev) == len(all_records())
    assert {r["tag"] for r in train} == set(TASKS) == {r["tag"] for r in ev}
    path = write_metadata(ev, tmp_path / "evaluation_metadata.jsonl")
    assert read_metadata(path) == ev
    (tmp_path / "bad.jsonl").write_text('{"tag": "colors", "prompt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: record lacks the field 'include'"):
        read_metadata(tmp_path / "bad.jsonl")


def test_every_prompt_is_tokenised_without_unknown_words():
    from visalign.models.tokenizer import UNK
    from visalign.worlds.shapes.base import PretrainConfig, build_components

    tok = build_components(PretrainConfig(block_out_channels=(32, 32)))[2]
    unk = tok.convert_tokens_to_ids(UNK)
    for r in all_records():
        ids = tok(r["prompt"], padding="max_length", max_length=16, truncation=True).input_ids
        assert unk not in ids, r["prompt"]
        assert ids.count(tok.eos_token_id) == 1  # not truncated


def test_renders_are_seeded_and_varied():
    rec = record_for_prompt("a photo of two squares")
    a, _ = render(rec, 7)
    b, _ = render(rec, 7)
    c, _ = render(rec, 8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    big, objs = render(rec, 3, size=64)
    assert big.shape == (64, 64, 3) and len(objs) == 2
    assert _key(detect(big).objects) == _key(objs)
    sizes = {o.box[2] - o.box[0] for i in range(50) for o in render(rec, i)[1]}
    assert len(sizes) >= 3
    assert set(SHAPES) == {r["include"][0]["class"] for r in all_records() if r["tag"] == "single_object"}
    assert len(COLORS) == 6
    random.Random(0)


def test_balanced_records_and_the_renderer_pipeline():
    import torch

    from visalign.worlds.shapes.oracle import RenderPipeline
    from visalign.worlds.shapes.render import balanced_records

    recs = balanced_records("eval", 7)
    assert len(recs) == 42 and all(sum(r["tag"] == t for r in recs) == 7 for t in TASKS)
    eval_prompts = {r["prompt"] for r in prompt_records("eval")}
    assert {r["prompt"] for r in recs} <= eval_prompts
    pipe = RenderPipeline()
    prompts = [r["prompt"] for r in recs[:12]]
    latents = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = pipe.sample(prompts, latents=latents)
    again = pipe.sample(prompts, latents=latents)
    assert torch.equal(out.images, again.images)
    rewards = ShapesReward()(out.images, prompts)
    assert torch.all(rewards == 1.0)  # renders satisfy their prompts exactly


def test_every_enumerated_caption_parses_back_to_its_record():
    from visalign.worlds.shapes.captions import parse_caption
    from visalign.worlds.shapes.render import all_records

    for r in all_records():
        assert parse_caption(r["prompt"]) == r


@pytest.mark.parametrize("text,tag,include", [
    ("a photo of a square and a circle", "two_object", [("square", None), ("circle", None)]),
    ("A photo of an orange Triangle.", "colors", [("triangle", "orange")]),
    ("a blue square and a red circle", "color_attr", [("square", "blue"), ("circle", "red")]),
    ("a photo of the circle right of a triangle", "position", [("triangle", None), ("circle", None)]),
    ("a photo of one square", "single_object", [("square", None)]),
])
def test_geneval_template_wordings_parse(text, tag, include):
    from visalign.worlds.shapes.captions import parse_caption

    rec = parse_caption(text)
    assert rec["tag"] == tag and rec["prompt"] == text
    assert [(c["class"], c.get("color")) for c in rec["include"]] == include


@pytest.mark.parametrize("text,count", [("a photo of 3 circles", 3), ("four triangles", 4), ("two squares", 2)])
def test_counts_in_words_or_digits_exclude_one_more(text, count):
    from visalign.worlds.shapes.captions import parse_caption

    rec = parse_caption(text)
    assert rec["include"][0]["count"] == count and rec["exclude"][0]["count"] == count + 1


@pytest.mark.parametrize("text,why", [("a photo of a cat", "'cat'"), ("a photo of a circle and a circle", "two"),
                                      ("a red circle and a square", "colour or neither"),
                                      ("a photo of", "nothing after")])
def test_text_outside_the_templates_is_refused_with_the_reason(text, why):
    from visalign.worlds.shapes.captions import CaptionError, parse_caption

    with pytest.raises(CaptionError, match="not a ShapesWorld caption") as e:
        parse_caption(text)
    assert why in str(e.value)


def test_shapes_reward_scores_a_reworded_caption_like_the_canonical_one():
    from visalign.worlds.shapes.render import render
    from visalign.worlds.shapes.reward import ShapesReward

    img = torch.from_numpy(render(record_for_prompt("a photo of a circle and a square"), 3)[0]).permute(2, 0, 1)
    imgs = img.float().div(255).unsqueeze(0).repeat(2, 1, 1, 1)
    scores = ShapesReward()(imgs, ["a photo of a circle and a square", "a photo of a square and a circle"])
    assert scores[0] == scores[1] and scores[0] > 0.9
