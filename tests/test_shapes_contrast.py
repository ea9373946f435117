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
        assert len(objects) - len(wrong) in (0, 1)
        if len(wrong) == len(objects):
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


def test_every_task_has_edits():
    assert set(EDITS) == set(TASKS)
