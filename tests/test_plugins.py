"""Plug-ins are discovered, not listed: every module of the plugin packages, and third-party packages
through the ``visalign.plugins`` entry-point group, with no edit to visalign."""

import os
import subprocess
import sys
from pathlib import Path

from helpers import write_pairs

HERE = Path(__file__).resolve().parent


def _installed_plugin(root: Path) -> dict:
    """An environment in which the example plug-in is 'installed': a dist-info with its entry point."""
    dist = root / "visalign_example_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: visalign-example-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[visalign.plugins]\nexample = visalign_example_plugin\n")
    path = os.pathsep.join([str(root), str(HERE / "plugin_example"), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def test_a_plugin_package_adds_a_method_and_a_reward_without_touching_visalign(tiny_dir, tmp_path):
    env = _installed_plugin(tmp_path / "site")
    listed = subprocess.run([sys.executable, "-m", "visalign", "list"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert "example_winner_sft" in listed.stdout and "example_brightness" in listed.stdout
    data = write_pairs(tmp_path / "p.parquet", n=4)
    run = subprocess.run([sys.executable, "-m", "visalign", "finetune", "shapes", f"model.path={tiny_dir('pixel')}",
                          f"data.path={data}", f"train.output_dir={tmp_path / 'run'}", "objective=example_winner_sft",
                          "train.steps=2", "train.batch_size=2", "train.save_every=0", "train.threads=1",
                          "train.tracker=none"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").exists()
    scored = subprocess.run([sys.executable, "-m", "visalign", "score-pairs", "--data", str(data), "--reward",
                             "example_brightness", "--out", str(tmp_path / "scored")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr[-2000:]


def test_a_broken_plugin_is_one_line_naming_it(tmp_path):
    env = _installed_plugin(tmp_path / "site")
    (tmp_path / "site" / "visalign_example_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[visalign.plugins]\nbroken = no_such_module_anywhere\n")
    r = subprocess.run([sys.executable, "-m", "visalign", "list"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "plug-in 'broken'" in r.stderr and "Traceback" not in r.stderr


def test_a_world_provides_prompts_and_real_images_by_scheme():
    from visalign.data.prompts import read_prompts
    from visalign.eval.commands import real_images
    from visalign.registry import PROMPT_SOURCES, REAL_IMAGES

    @PROMPT_SOURCES.register("testworld")
    def prompts(spec, where):
        return [f"{spec} {i}" for i in range(3)]

    assert read_prompts("testworld:thing") == ["thing 0", "thing 1", "thing 2"]
    assert len(read_prompts("shapes:eval")) == 90  # ShapesWorld registers itself the same way
    imgs = real_images("shapes:eval", 4, seed=1)
    assert imgs.shape[:2] == (4, 3) and imgs.dtype.__str__() == "torch.uint8"
    assert "shapes" in REAL_IMAGES and "testworld" not in REAL_IMAGES
