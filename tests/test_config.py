"""Strict configs: layering, one-line errors, component signatures, and every YAML under configs/."""

from pathlib import Path

import pytest
import yaml

from visalign.config import load_config
from visalign.registry import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_layering_preset_yaml_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: {lr: 0.002, steps: 7}\nobjective: {name: diffusion_dpo, beta: 100}\n")
    cfg = load_config("shapes", [str(f)], ["train.steps=9", "objective.head=ipo", "objective.head.tau=0.25",
                                            "lora.targets=to_q,to_v", "train.validation_prompts=[a, b]"])
    assert cfg.train.lr == 0.002 and cfg.train.steps == 9
    assert cfg.objective.kwargs["beta"] == 100.0 and isinstance(cfg.objective.kwargs["beta"], float)
    assert cfg.objective.kwargs["head"].name == "ipo" and cfg.objective.kwargs["head"].kwargs == {"tau": 0.25}
    assert cfg.lora.targets == ["to_q", "to_v"] and cfg.train.validation_prompts == ["a", "b"]
    # a nested key on the default head keeps that head
    cfg = load_config("shapes", [], ["objective.head=smpo", "objective.head.gain=3"])
    assert cfg.objective.kwargs["head"].kwargs == {"gain": 3.0}
    cfg = load_config("shapes", [], ["objective=kto"])
    assert cfg.objective.name == "kto" and "beta" not in cfg.objective.kwargs  # kto's own default, not DPO's


@pytest.mark.parametrize("override,pattern", [
    (["train.lrr=1"], r"^unknown key train\.lrr; valid keys: .*lr.*; did you mean 'lr'\?$"),
    (["trian.lr=1"], r"^unknown key trian; valid keys: .*did you mean 'train'\?$"),
    (["train.lr=fast"], r"^train\.lr='fast': expected float$"),
    (["train.steps=2.5"], r"^train\.steps=2\.5: expected int$"),
    (["data.hflip=maybe"], r"^data\.hflip='maybe': expected bool"),
    (["objective=dpo_diffusion"], r"^unknown method 'dpo_diffusion'; valid: .*; did you mean 'diffusion_dpo'\?$"),
    (["objective.head=ipoo"], r"^unknown head 'ipoo'; valid: .*did you mean 'ipo'\?$"),
    (["objective.head=ipo", "objective.head.taux=1"], r"^unknown key objective\.head\.taux for head 'ipo'; "
                                                       r"valid keys: tau; did you mean 'tau'\?$"),
    (["model.resolutin=512"], r"^unknown key model\.resolutin for backbone 'pixel'; valid keys: path, revision"),
    (["model=sdx"], r"^unknown backbone 'sdx'"),
    (["train.mixed_precision=fp8"], r"^train\.mixed_precision='fp8': expected one of no, bf16, fp16"),
    (["lr"], r"^override 'lr': expected key=value"),
])
def test_config_errors_are_one_line_and_name_the_key(override, pattern):
    with pytest.raises(ConfigError) as e:
        load_config("shapes", [], override)
    msg = str(e.value)
    assert "\n" not in msg
    assert __import__("re").search(pattern, msg), msg


def test_unknown_model_and_missing_file():
    with pytest.raises(ConfigError, match="unknown model 'sd16'.*did you mean 'sd15'"):
        load_config("sd16")
    with pytest.raises(ConfigError, match="config file nope.yaml does not exist"):
        load_config("shapes", ["nope.yaml"])


# finetune configs; configs/{accelerate,eval,pretrain} hold other commands' configs (tested where they are used)
RUN_YAMLS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                   if not {"accelerate", "eval", "pretrain"} & set(p.relative_to(ROOT).parts))
ACCEL_YAMLS = sorted((ROOT / "configs" / "accelerate").rglob("*.yaml"))


def test_configs_exist():
    assert len(RUN_YAMLS) >= 6 and len(ACCEL_YAMLS) >= 3


@pytest.mark.parametrize("path", RUN_YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_run_yaml_validates(path):
    model = path.parent.name
    cfg = load_config(model, [str(path)])
    raw = yaml.safe_load(path.read_text())
    assert cfg.objective.name == raw["objective"]["name"]
    from visalign.registry import BACKBONES
    from visalign.train.build import build_method, check_capabilities

    check_capabilities(build_method(cfg.objective), BACKBONES.get(cfg.model.name))


@pytest.mark.parametrize("path", ACCEL_YAMLS, ids=lambda p: p.name)
def test_every_accelerate_yaml_is_a_valid_accelerate_config(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 2
    assert cfg.distributed_type.value in ("MULTI_GPU", "FSDP", "DEEPSPEED", "MULTI_CPU")
