"""The command line: list, config, doctor, and one-line errors with exit code 2."""

import subprocess
import sys

import pytest

from visalign.cli import main


def test_list_prints_every_registry_with_docs(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for section in ("backbones:", "methods:", "heads:", "rewards:"):
        assert section in out
    for name in ("sd ", "sdxl", "sd3", "pixel", "diffusion_dpo", "kto", "mapo", "ipo", "robust", "shapes"):
        assert name in out
    assert "Diffusion-DPO on preference pairs" in out


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "sd15", "train.lr=3e-6", "objective.head=robust", "objective.head.eps=0.2"]) == 0
    out = capsys.readouterr().out
    assert "lr: 3.0e-06" in out and "name: robust" in out and "eps: 0.2" in out and "name: sd" in out


def test_config_error_is_one_line_exit_2(capsys):
    assert main(["config", "shapes", "train.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown key train.lrr") and "\n" not in err


def test_doctor_reports_versions_and_device(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for key in ("torch", "diffusers", "transformers", "device", "bf16", "sdpa", "xformers"):
        assert key in out


def test_module_entry_point_and_missing_model_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "visalign", "eval", "geneval", "--model", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "model_index.json" in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["--help"], ["finetune", "--help"], ["make-dataset", "--help"],
                                  ["eval", "geneval", "--help"]])
def test_help(args):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0


def test_overrides_after_options_work_as_the_readme_writes_them(capsys):
    """`visalign finetune shapes -c FILE key=value`: key=value words may follow options."""
    assert main(["config", "shapes", "-c", "configs/shapes/dpo.yaml", "train.lr=3e-5", "train.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "lr: 3.0e-05" in out and "steps: 7" in out and "rank: 8" in out


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    import visalign.cli as cli

    def broken(args):
        raise RuntimeError("an internal invariant broke")

    monkeypatch.setattr(cli, "cmd_doctor", broken)
    assert cli.main(["doctor"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "an internal invariant broke" in err and "please report it" in err


def test_prompt_files_are_read_by_content_whatever_their_name(tmp_path):
    from visalign.data.prompts import read_prompts

    (tmp_path / "prompts").write_text("a photo of a red circle\n\na photo of two squares\n")
    assert read_prompts(str(tmp_path / "prompts")) == ["a photo of a red circle", "a photo of two squares"]
    (tmp_path / "meta.data").write_text('{"prompt": "a photo of a square", "tag": "single_object"}\n')
    assert read_prompts(str(tmp_path / "meta.data")) == ["a photo of a square"]


def test_geneval_prompt_set_ships_by_name(tmp_path, capsys):
    from visalign.data.prompts import read_prompts
    from visalign.worlds.shapes.render import read_metadata

    records = read_metadata("geneval")
    assert len(records) == 553 and {r["tag"] for r in records} == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert read_prompts("geneval")[0] == records[0]["prompt"]
    # GenEval's COCO classes need the open-vocabulary detector: said before any model loads
    assert main(["eval", "geneval", "--model", "/nonexistent", "--metadata", "geneval", "--out", str(tmp_path)]) == 2
    assert "--detector owlv2" in capsys.readouterr().err
    assert main(["eval", "winrate", "--model", "/x", "--baseline", "/x", "--reward", "shapes", "--prompts", "genevl",
                 "--out", str(tmp_path)]) == 2
    assert "not a named prompt set (geneval" in capsys.readouterr().err


def test_a_local_copy_in_the_hubs_layout_loads_with_its_splits(tmp_path):
    from helpers import write_pairs

    from visalign.data.pairs import load_any

    root = tmp_path / "pickapic-mini"
    write_pairs(root / "data" / "train-00000-of-00001.parquet", n=6)
    write_pairs(root / "data" / "test-00000-of-00001.parquet", n=2, seed=1)
    (root / "README.md").write_text("---\nlicense: mit\n---\n# a dataset card\n")
    assert len(load_any(str(root), "train")) == 6 and len(load_any(str(root), "test")) == 2
