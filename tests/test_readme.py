"""Every command the README shows, run in order on tiny models (the docs check).

Each shell line of a ```bash block is run as written, with only these changes, so that CI needs no real
weights and finishes in minutes: real model paths and hub ids become tiny local stand-ins (SUBSTITUTE),
and each subcommand gets a few speed flags appended (FAST: fewer steps, prompts and samples). A README
command this file cannot run fails the test, so a new command must come with a way to run it.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_pickscore, write_pairs

from visalign.cli import main

ROOT = Path(__file__).resolve().parents[1]
SKIP = ("make ", "python3 -m venv")  # run by CI itself: `make test` creates the venv and installs

FAST = {
    "finetune": ["train.steps=2", "train.batch_size=2", "train.save_every=0", "train.threads=1",
                 "train.tracker=none", "train.validation_every=0", "train.mixed_precision=no", "data.max_rows=8"],
    "make-dataset": ["--max-prompts", "3", "--steps", "2", "--threads", "1"],
    "geneval": ["--steps", "2", "--samples-per-prompt", "1", "--per-task", "1"],
    "winrate": ["--steps", "2", "--samples-per-prompt", "1"],
    "fid": ["--steps", "2"],
    "score-pairs": ["--max-rows", "6"],
    "diagnose": ["--n-prompts", "2"],
}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith(SKIP):
                out.append(line)
    return out


@pytest.fixture(scope="module")
def stand_ins(tiny_dir, tmp_path_factory, tiny_owl):
    root = tmp_path_factory.mktemp("readme")
    owl = tiny_owl
    pairs = root / "pickapic"
    pairs.mkdir()
    write_pairs(pairs / "train-00000.parquet", n=8, labels=[1, 0, 1, 0, 1, 0, 1, 1])
    hub = root / "hub"
    (hub / "data").mkdir(parents=True)
    write_pairs(hub / "data" / "train-00000-of-00001.parquet", n=8)
    ps, proc = tiny_pickscore(root)
    return {"root": root, "pairs": pairs, "hub": hub, "ps": ps, "proc": proc, "owl": owl}


def _substitute(line: str, tiny_dir, s: dict) -> str:
    subs = {
        "assets/shapes-base": str(tiny_dir("pixel")), "configs/": f"{ROOT}/configs/",
        "/models/sdxl": str(tiny_dir("sdxl")), "/models/sd35-medium": str(tiny_dir("sd3")),
        "/models/flux-dev": str(tiny_dir("flux")), "/models/sana": str(tiny_dir("sana")),
        "/data/pickapic": str(s["pairs"]), "yuvalkirstain/pickapic_v2": str(s["hub"]),
        "/models/PickScore_v1": str(s["ps"]), "/models/clip-h": str(s["proc"]),
        "/models/owlv2": str(s["owl"]), "ViT-L-14": "visalign-tiny-clip", "/models/clip-l.bin": "''",
        "--n 1000": "--n 20",
    }
    for old, new in subs.items():
        line = line.replace(old, new)
    return line


def _family_class(preset: str):
    from visalign.registry import BACKBONES, PRESETS

    return BACKBONES.get(PRESETS.get(preset)()["model"]["name"])


def _argv(line: str, tiny_dir) -> list[str]:
    argv = shlex.split(line)
    sub = argv[1] if argv[0] == "visalign" else None
    key = argv[2] if sub == "eval" else sub
    extra = list(FAST.get(key, []))
    if sub == "finetune":
        if argv[2] == "shapes":
            extra.append(f"model.path={tiny_dir('pixel')}")  # the recipe's own model.path is the real base
        if argv[2] != "shapes":  # the recipes' 512-1024 px and long prompts are real-model sizes
            extra += ["model.resolution=32", *(f"model.{k}={v}" for k, v in _family_class(argv[2]).tiny_kwargs.items()
                                               if k != "resolution")]
        if "objective=smpo" in argv:
            extra.append("objective.steps=2")
        if any(a.endswith("grpo.yaml") for a in argv):
            extra += ["objective.group_size=2", "objective.prompts_per_round=2", "objective.steps=3",
                      "objective.window=2", "objective.round_steps=2"]
    return argv + extra


def _prepare_inputs(cwd: Path) -> None:
    from visalign.eval.grid import save_png, to_pil

    (cwd / "prompts.txt").write_text("a photo of a red circle\na photo of two squares\na photo of a cat\n")
    rows = []
    for i in range(3):
        save_png(to_pil(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i))), cwd / f"im{i}.png")
        rows.append(json.dumps({"image": f"im{i}.png", "class": "dog", "count": i}))
    (cwd / "labels.jsonl").write_text("\n".join(rows) + "\n")


def test_every_readme_command_runs(tiny_dir, stand_ins, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VISALIGN_CACHE", str(tmp_path / "cache"))
    _prepare_inputs(tmp_path)
    commands = readme_commands()
    assert len(commands) >= 15 and any("accelerate launch" in c for c in commands)
    for line in commands:
        line = _substitute(line, tiny_dir, stand_ins)
        if line.startswith("ACCELERATE_USE_CPU=1 accelerate launch"):
            argv = shlex.split(line.split(" ", 1)[1])
            argv = [str(Path(sys.executable).parent / "accelerate"), *argv[1:3], "--main_process_port", "29741",
                    *argv[3:], *FAST["finetune"], f"model.path={tiny_dir('pixel')}"]
            env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
            r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
            assert r.returncode == 0, (line, r.stdout[-2000:], r.stderr[-2000:])
            continue
        argv = _argv(line, tiny_dir)
        assert argv[0] == "visalign", f"the README shows a command this check cannot run: {line}"
        code = main(argv[1:])
        out = capsys.readouterr()
        assert code == 0, (line, out.err[-2000:])
