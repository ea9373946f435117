"""Contrast pairs: the render passes its prompt, the near miss fails it, and they differ in one attribute."""

import random

import numpy as np
import pytest

from visalign.worlds.shapes.contrast import EDITS, contrast_pair, near_miss
from visalign.worlds.shapes.detector import detect, evaluate_objects
from visalign.worlds.shapes.render import prompt_records, scene_for
from visalign.worlds.shapes.vocab import TASKS


@pytest.mark.parametrize("task", TASKS)
def test_near_miss_fails_the_prompt_by_one_edit(task):
    records = [r for r in prompt_records("all") if r["tag"] == task]
    rng = random.Random(0)
    for k in range(40):
        record = records[k % len(records)]
        objects = scene_for(record, rng)
        wrong = near_miss(record, objects, rng)
        assert wrong is not None
        assert evaluate_objects(objects, record)[0] and not evaluate_objects(wrong, record)[0]
        assert len(wrong) - len(objects) in (-1, 0, 1)
        if len(wrong) == len(objects) + 1:  # one object drawn twice: same class, colour and size, elsewhere
            assert wrong[:-1] == objects
            twin = [o for o in objects if (o.shape, o.color) == (wrong[-1].shape, wrong[-1].color)]
            assert any(o.box[2] - o.box[0] == wrong[-1].box[2] - wrong[-1].box[0] for o in twin)
            assert all(wrong[-1].box[0] > o.box[2] or wrong[-1].box[2] < o.box[0] or wrong[-1].box[1] > o.box[3]
                       or wrong[-1].box[3] < o.box[1] for o in objects)
        elif len(wrong) == len(objects):
            changed = [(a, b) for a, b in zip(objects, wrong) if a != b]
            # one attribute edited on one object, or the two objects' places or colours swapped
            assert len(changed) == 1 or (len(changed) == 2 and len(objects) == 2)
            fields = {f for a, b in changed for f in ("shape", "color", "box") if getattr(a, f) != getattr(b, f)}
            assert len(fields) == 1


def test_contrast_pair_is_seeded_and_the_detector_agrees():
    record = next(r for r in prompt_records("all") if r["tag"] == "color_attr")
    good, bad = contrast_pair(record, seed=3)
    again = contrast_pair(record, seed=3)
    assert np.array_equal(good, again[0]) and np.array_equal(bad, again[1])
    assert not np.array_equal(good, bad)
    assert evaluate_objects(detect(good).objects, record)[0]
    assert not evaluate_objects(detect(bad).objects, record)[0]


def test_counting_near_misses_over_and_under_count():
    """Count near misses go both ways: a base model over-counts as well as under-counts."""
    records = [r for r in prompt_records("all") if r["tag"] == "counting"]
    rng = random.Random(1)
    deltas = set()
    for k in range(60):
        objects = scene_for(records[k % len(records)], rng)
        deltas.add(len(near_miss(records[k % len(records)], objects, rng)) - len(objects))
    assert {-1, 1} <= deltas


def test_added_copy_uses_the_whole_larger_canvas():
    record = next(r for r in prompt_records("all") if r["tag"] == "counting")
    rng = random.Random(2)
    added = []
    for _ in range(60):
        objects = scene_for(record, rng, 64)
        wrong = near_miss(record, objects, rng, size=64)
        if len(wrong) == len(objects) + 1:
            added.append(wrong[-1])
    assert len(added) > 10
    assert all(0 < o.box[0] and o.box[2] < 64 and 0 < o.box[1] and o.box[3] < 64 for o in added)
    # not confined to the 32-pixel default canvas
    assert any(o.box[0] > 32 or o.box[1] > 32 for o in added)


def test_every_task_has_edits():
    assert set(EDITS) == set(TASKS)
