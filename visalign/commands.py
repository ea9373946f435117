"""The command functions behind `visalign ...`: each reads its parsed arguments and calls the library."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path


def cmd_list(args) -> None:
    from .registry import ALL, load_all

    load_all()
    for kind, reg in ALL.items():
        print(f"{kind}:")
        for name, doc in reg.docs().items():
            print(f"  {name:<16} {doc}")


def cmd_config(args) -> None:
    from .config import dump_config, load_config

    print(dump_config(load_config(args.model, args.config, args.overrides)), end="")


def cmd_doctor(args) -> None:
    import importlib.util

    import torch

    def version(mod: str) -> str:
        try:
            return __import__(mod).__version__
        except Exception:
            return "not installed"

    cuda = torch.cuda.is_available()
    print(f"visalign      {version('visalign')}")
    for mod in ("torch", "diffusers", "transformers", "accelerate", "peft", "datasets", "safetensors"):
        print(f"{mod:<13} {version(mod)}")
    print(f"device        {'cuda: ' + torch.cuda.get_device_name(0) if cuda else 'cpu'} "
          f"({torch.get_num_threads()} threads)")
    from .models.load import native_bf16

    bf16 = native_bf16("cuda" if cuda else "cpu")
    print(f"bf16          {'yes' if bf16 else 'no'}")
    print(f"sdpa          {'yes' if hasattr(torch.nn.functional, 'scaled_dot_product_attention') else 'no'}")
    xf = importlib.util.find_spec("xformers") is not None
    note = ("installed" + ("" if cuda else " (no CPU kernels; SDPA is used)")) if xf else "no (SDPA is used)"
    print(f"xformers      {note}")


def cmd_finetune(args) -> None:
    from .config import load_config
    from .train.loop import train

    cfg = load_config(args.model, args.config, args.overrides)
    summary = train(cfg)
    print(json.dumps(summary, indent=2))


def cmd_make_dataset(args) -> None:
    from .config import load_section
    from .data.make_dataset import MakeDatasetConfig, make_dataset

    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(MakeDatasetConfig)}
    cfg = load_section(MakeDatasetConfig, args.config, flags, args.overrides, "make-dataset")
    rank, world = 0, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        rank, world = state.process_index, state.num_processes
    summary = make_dataset(cfg, rank, world)
    print(json.dumps(summary))


def cmd_score_pairs(args) -> None:
    from .config import load_section
    from .data.score_pairs import ScorePairsConfig, score_pairs

    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(ScorePairsConfig)}
    cfg = load_section(ScorePairsConfig, args.config, flags, args.overrides, "score-pairs")
    print(json.dumps(score_pairs(cfg)))


EVAL_COMMANDS = {"geneval": ("cmd_eval_geneval", "GenevalConfig"),
                 "calibrate-detector": ("cmd_eval_calibrate_detector", "CalibrateConfig"),
                 "fid": ("cmd_eval_fid", "FidConfig"), "winrate": ("cmd_eval_winrate", "WinrateConfig")}


FOLDER_OUTPUTS = ("geneval", "fid", "winrate")  # eval commands whose --out is a folder


def cmd_eval(name: str, args) -> None:
    """`eval NAME`: its typed config from -c files, flags and key=value, then the command."""
    from .config import load_section
    from .eval import commands, configs
    from .files import check_writable_folder

    run, config_class = EVAL_COMMANDS[name]
    cls = getattr(configs, config_class)
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    cfg = load_section(cls, args.config, flags, args.overrides, f"eval {name}")
    if name in FOLDER_OUTPUTS and getattr(cfg, "out", ""):  # before any model loads or image is sampled
        check_writable_folder(cfg.out, "--out")
    getattr(commands, run)(cfg)


def cmd_world_features(args) -> None:
    from .worlds.shapes.features import train_feature_net

    print(json.dumps(train_feature_net(args.out, steps=args.steps), indent=2))


def cmd_world_pretrain(args) -> None:
    from .config import load_section
    from .worlds.shapes.base import PretrainConfig, pretrain

    cfg = load_section(PretrainConfig, args.config, {}, args.overrides, "pretrain")
    print(f"wrote {pretrain(cfg, args.out)}")


def cmd_world_prompts(args) -> None:
    from .worlds.shapes.render import balanced_records, prompt_records, write_metadata

    records = balanced_records(args.split, args.per_task) if args.per_task else prompt_records(args.split)
    print(f"wrote {write_metadata(records, args.out)}")


def cmd_reward_server(args) -> None:
    from .data.make_dataset import parse_reward
    from .registry import load_all
    from .rewards.base import build_reward
    from .rewards.server import TOKEN_ENV, is_local, make_server

    load_all()
    name, _, kwargs = parse_reward(args.reward)
    token = os.environ.get(TOKEN_ENV) or None
    if not is_local(args.host):
        print(f"warning: --host {args.host} serves the reward beyond this machine"
              + ("" if token else f", to anyone who can reach it: set {TOKEN_ENV} to require a bearer token"),
              file=sys.stderr)
    server = make_server(build_reward({"name": name, **kwargs}), args.host, args.port, token=token)
    print(f"serving reward {name} on http://{args.host}:{args.port}/score"
          f"{' (bearer token required)' if token else ''} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()


def cmd_report(args) -> None:
    from .eval.report import build_report

    print(f"wrote {build_report(args.run_dir, args.baseline, grid=not args.no_grid)}")


def cmd_diagnose(args) -> None:
    from .data.prompts import read_prompts
    from .eval.diagnose import diagnose_run, format_diagnosis

    prompts = read_prompts(args.prompts)[: args.n_prompts]
    result = diagnose_run(args.run_dir, prompts, args.baseline, args.out, args.seed)
    print(format_diagnosis(result))
    print(f"wrote {Path(args.out or args.run_dir) / 'diagnose.json'} and diagnose.png")


def cmd_export_lora(args) -> None:
    from .models.export import export_kohya

    if args.format != "kohya":
        raise FileNotFoundError(f"unknown export format {args.format!r}; expected kohya")
    print(f"wrote {export_kohya(args.lora, args.out, args.family)}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, base=args.base,
             **({"guidance": args.guidance} if args.guidance is not None else {}))


def cmd_plan(args) -> None:
    """`plan PRESET [-c FILE] [key=value ...]`: the run's memory by part, before any weight loads."""
    from .config import load_config
    from .models.plan import SIZES_GB, RunShape, advice, format_plan, plan_parts, published_config
    from .models.plan_fit import activation_models
    from .registry import METHODS

    cfg = load_config(args.model, args.config, args.overrides)
    kw, obj, t = cfg.model.kwargs, cfg.objective.kwargs, cfg.train
    kind = getattr(METHODS.get(cfg.objective.name), "data", "pairs")
    group = int(obj.get("group_size", obj.get("samples_per_prompt", 8)))
    shape = RunShape(
        family=cfg.model.name, path=kw.get("path"), resolution=kw.get("resolution"), batch=t.batch_size,
        images_per_sample=1 if kind == "prompts" else 2, lora_rank=cfg.lora.rank if cfg.lora.enabled else 0,
        lora_targets=tuple(cfg.lora.targets) if getattr(cfg.lora, "targets", None) else RunShape.lora_targets,
        quantize=kw.get("quantize", "none"), checkpointing=t.gradient_checkpointing, optimizer=t.optimizer,
        compute="bf16" if t.mixed_precision in ("bf16", "fp16") else "fp32",
        cache_complete=bool(getattr(args, "cache_complete", False)),
        rollouts=group * int(obj.get("prompts_per_round", 0)) if kind == "prompts" else 0,
        rollout_steps=int(obj.get("steps", 0)) if kind == "prompts" else 0)
    config = published_config(shape.family, shape.path if shape.path and Path(shape.path).is_dir() else None)
    from .data.cache import cache_root

    free, ckpt = activation_models(config, shape.family, cache_root() / "plan", lora=bool(shape.lora_rank))
    tips = {size: advice(shape, config, free, ckpt, size) for size in SIZES_GB}
    print(format_plan(shape, config, plan_parts(shape, config, free, ckpt), tips))
