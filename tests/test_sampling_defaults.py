"""A model folder declares the guidance it is sampled at (visalign_sampling.json); every command that samples
uses it unless told otherwise, and falls back to the family's usual guidance."""

import json
import shutil

import pytest

from visalign.cli import main
from visalign.config import load_config
from visalign.models.load import ModelLoadError, declared_sampling
from visalign.models.pixel import PixelBackbone


@pytest.fixture
def declared(tiny_dir, tmp_path):
    """A copy of the tiny pixel pipeline that declares guidance 2.0."""
    path = tmp_path / "declared"
    shutil.copytree(tiny_dir("pixel"), path)
    (path / "visalign_sampling.json").write_text(json.dumps({"guidance": 2.0, "note": "measured"}))
    return path


@pytest.fixture
def sampled_guidance(monkeypatch):
    """The guidance of every PixelBackbone.sample call, in order."""
    seen = []
    sample = PixelBackbone.sample

    def spy(self, *args, **kwargs):
        seen.append(kwargs["guidance"])
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(PixelBackbone, "sample", spy)
    return seen


def test_the_run_config_takes_the_folders_guidance_unless_set(declared, tiny_dir):
    assert load_config("shapes").train.guidance == 1.5  # the shipped base declares its measured best
    from visalign.worlds.shapes.base import sampling_declaration

    # ... exactly what `world shapes pretrain` writes for a v base, so a rebuilt base declares the same
    assert declared_sampling("assets/shapes-base") == sampling_declaration("v_prediction")
    assert load_config("shapes", [], [f"model.path={declared}"]).train.guidance == 2.0
    assert load_config("shapes", [], [f"model.path={declared}", "train.guidance=4"]).train.guidance == 4.0
    assert load_config("shapes", [], [f"model.path={tiny_dir('pixel')}"]).train.guidance == 3.0  # pixel's usual
    # hub ids: nothing to read offline, so the family's usual guidance
    assert [load_config(m).train.guidance for m in ("sd15", "sdxl", "sd3")] == [7.5, 5.0, 4.5]


def test_eval_and_make_dataset_sample_at_each_models_declared_guidance(declared, tiny_dir, tmp_path,
                                                                        sampled_guidance):
    plain = tiny_dir("pixel")
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}],
                                "prompt": "a photo of a circle"}) + "\n")
    geneval = ["eval", "geneval", "--metadata", str(meta), "--samples-per-prompt", "2", "--steps", "2"]
    assert main([*geneval, "--model", str(declared), "--out", str(tmp_path / "g1")]) == 0
    assert json.loads((tmp_path / "g1" / "metrics.json").read_text())["guidance"] == 2.0
    assert main([*geneval, "--model", str(declared), "--guidance", "5", "--out", str(tmp_path / "g2")]) == 0
    assert json.loads((tmp_path / "g2" / "metrics.json").read_text())["guidance"] == 5.0
    assert sampled_guidance == [2.0, 5.0]

    sampled_guidance.clear()
    assert main(["make-dataset", "--model", f"pixel={declared}", "--model", f"pixel={plain}", "--prompts",
                 "shapes:train", "--max-prompts", "2", "--images-per-prompt", "1", "--steps", "2", "--out",
                 str(tmp_path / "data")]) == 0
    prov = json.loads((tmp_path / "data" / "provenance.json").read_text())
    assert [m["guidance"] for m in prov["models"]] == [2.0, 3.0] and prov["guidance"] is None
    assert sorted(set(sampled_guidance)) == [2.0, 3.0]

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a circle\na photo of two squares\n")
    assert main(["eval", "winrate", "--model", str(declared), "--baseline", str(plain), "--reward", "shapes",
                 "--prompts", str(prompts), "--samples-per-prompt", "1", "--steps", "2",
                 "--out", str(tmp_path / "wr")]) == 0
    assert json.loads((tmp_path / "wr" / "winrate.json").read_text())["guidance"] == {"model": 2.0, "baseline": 3.0}


@pytest.mark.parametrize("content, message", [
    ('{"guidance": 2.0, "steps": 20}',
     r"expected a mapping with the keys guidance, note; found \['guidance', 'steps'\]"),
    ('{"guidance": "high"}', r"guidance='high': expected a positive number"),
    ('{"guidance": 0}', r"guidance=0: expected a positive number"),
    ("guidance: 2", r"not valid JSON"),
])
def test_a_bad_sampling_file_is_one_clear_error_naming_it(declared, capsys, content, message):
    (declared / "visalign_sampling.json").write_text(content)
    with pytest.raises(ModelLoadError, match=message):
        declared_sampling(str(declared))
    assert main(["config", "shapes", f"model.path={declared}"]) == 2
    err = capsys.readouterr().err
    assert f"{declared / 'visalign_sampling.json'}" in err and "Traceback" not in err
