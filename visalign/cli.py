"""The ``visalign`` command line."""

from __future__ import annotations

import argparse
import os
import sys

from .commands import (  # noqa: F401  (the parser's targets)
    cmd_config,
    cmd_demo,
    cmd_diagnose,
    cmd_doctor,
    cmd_eval,
    cmd_export_lora,
    cmd_finetune,
    cmd_list,
    cmd_make_dataset,
    cmd_plan,
    cmd_report,
    cmd_reward_server,
    cmd_score_pairs,
    cmd_world_features,
    cmd_world_pretrain,
    cmd_world_prompts,
)


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass


# how each command spells the config keys its errors name (errors.spelled)
REWARD_FLAG_SPELLINGS = {f"{r}.{k}": f"--reward {r}:1:{k}=" for r, k in (
    ("pickscore", "model"), ("hpsv2", "checkpoint"), ("aesthetic", "head"), ("aesthetic", "clip"), ("clip", "model"))}
EVAL_SPELLINGS = {"model.path": "--model ", "data.path": "--prompts ", "prompts": "--prompts ",
                  **REWARD_FLAG_SPELLINGS}
SCORE_PAIRS_SPELLINGS = {"data.path": "--data ", **REWARD_FLAG_SPELLINGS}
MAKE_DATASET_SPELLINGS = {"model.path": "--model NAME=", "data.path": "--prompts ", "prompts": "--prompts ",
                          **REWARD_FLAG_SPELLINGS}


def _add_score_pairs_parser(sub) -> None:
    s = sub.add_parser("score-pairs", help="reward scores (and optional relabels) for an existing pairs dataset")
    s.add_argument("-c", "--config", action="append", default=[])
    s.add_argument("--data", help="pairs or ranked lists: parquet file or folder, hub-layout folder or hub id")
    s.add_argument("--format", choices=("pairs", "lists"))
    s.add_argument("--split")
    s.add_argument("--reward", dest="rewards", action="append", help="NAME[:WEIGHT][:key=value] (repeatable)")
    s.add_argument("--out")
    s.add_argument("--normalise", choices=("none", "zscore", "rank"))
    s.add_argument("--relabel", action="store_true", default=None, help="label_0 from the scores")
    s.add_argument("--tie-margin", dest="tie_margin", type=float, help="with --relabel: closer scores are a tie")
    for flag in ("shard-size", "max-rows", "threads"):
        s.add_argument(f"--{flag}", dest=flag.replace("-", "_"), type=int)
    s.add_argument("--overwrite", action="store_true", default=None)
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_score_pairs, spellings=SCORE_PAIRS_SPELLINGS)


def _sampling_args(s) -> None:
    """Options shared by the commands that generate: seed, sampler steps, guidance, threads."""
    s.add_argument("--seed", type=int, help="sampling seed (default 0)")
    s.add_argument("--steps", type=positive_int, help="sampler steps (default 20)")
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance (default: what the model folder declares in visalign_sampling.json, "
                        "else the family's usual: sd 7.5, sdxl 5, sd3 4.5, pixel 3)")
    s.add_argument("--threads", type=int)
    s.add_argument("--bf16", action="store_true", default=None,
                   help="sample under bf16 autocast (about 2x faster on AMX CPUs)")


def _eval_parser(ev, name: str, help: str):
    """An `eval NAME` parser: -c FILE and key=value beside its flags, one typed config (eval/configs.py)."""
    s = ev.add_parser(name, help=help, description=f"{help}. Flags, -c FILE (YAML) and key=value set the same "
                      "fields (--samples-per-prompt is samples_per_prompt).")
    s.add_argument("-c", "--config", action="append", default=[])
    s.add_argument("overrides", nargs="*", help="key=value settings")
    s.set_defaults(fn=lambda a: cmd_eval(name, a), spellings=EVAL_SPELLINGS)
    return s


def _add_eval_parsers(sub) -> None:
    """`visalign eval geneval|calibrate-detector|fid|winrate`."""
    ev = sub.add_parser("eval", help="evaluation").add_subparsers(dest="what", required=True)
    s = _eval_parser(ev, "geneval", "GenEval-style accuracy with fixed seeds")
    s.add_argument("--model", help="a diffusers folder (or hub id with --backbone); required")
    s.add_argument("--backbone", help="backbone name when the folder has no model_index.json")
    s.add_argument("--lora")
    s.add_argument("--metadata", help="GenEval metadata: a .jsonl file, geneval (its 553 prompts) or shapes:eval "
                   "(the default)")
    s.add_argument("--samples-per-prompt", type=positive_int, help="default 4")
    _sampling_args(s)
    s.add_argument("--detector", choices=("shapes", "owlv2"),
                   help="shapes (default): ShapesWorld's exact detector; owlv2: open-vocabulary, for real models")
    s.add_argument("--owl", help="OWLv2 folder or hub id (default google/owlv2-base-patch16-ensemble)")
    s.add_argument("--clip-arch", help="default ViT-L-14")
    s.add_argument("--clip-pretrained", help="open_clip tag or local checkpoint (default openai)")
    s.add_argument("--thresholds", help="owlv2: the JSON `eval calibrate-detector` wrote (default: GenEval's 0.3/0.9)")
    s.add_argument("--per-task", dest="per_task", type=positive_int, help="only the first N prompts of each task")
    s.add_argument("--out", help="output folder; required")

    s = _eval_parser(ev, "calibrate-detector", "fit the OWLv2 score thresholds on labelled images")
    s.add_argument("--labels", help="JSON lines of {image, class, count}; required")
    s.add_argument("--owl", help="OWLv2 folder or hub id (default google/owlv2-base-patch16-ensemble)")
    s.add_argument("--out", help="thresholds JSON, for `eval geneval --thresholds`; required")

    s = _eval_parser(ev, "fid", "FID against real images with a pinned, documented protocol")
    s.add_argument("--model", help="required")
    s.add_argument("--backbone")
    s.add_argument("--lora")
    s.add_argument("--real", help="shapes:eval|shapes:train renders, an image folder, or a dataset; required")
    s.add_argument("--n", type=positive_int, help="generated images (default 1000)")
    s.add_argument("--feature", choices=("shapes", "inception"), help="default shapes")
    s.add_argument("--feature-weights", help="ShapesWorld feature net (default assets/shapes-features)")
    s.add_argument("--inception-weights", help="local pt_inception-2015-12-05-6726825d.pth for --feature inception")
    s.add_argument("--prompts", help="a prompt file or source (default: ShapesWorld eval prompts)")
    _sampling_args(s)
    s.add_argument("--out", help="required")

    s = _eval_parser(ev, "winrate", "reward win-rate of a model over a baseline, same prompts and seeds")
    s.add_argument("--model", help="required")
    s.add_argument("--lora")
    s.add_argument("--baseline", help="required")
    s.add_argument("--baseline-lora")
    s.add_argument("--backbone")
    s.add_argument("--reward", help="NAME[:WEIGHT][:key=value,...]; required")
    s.add_argument("--prompts", help="shapes:eval, a .txt or .jsonl file, or a dataset; required")
    s.add_argument("--samples-per-prompt", type=positive_int, help="default 2")
    _sampling_args(s)
    s.add_argument("--out", help="required")


def _add_make_dataset_parser(sub) -> None:
    s = sub.add_parser("make-dataset", help="Syn-Pic-style ranked data: prompts -> images -> rewards -> ranks")
    s.add_argument("-c", "--config", action="append", default=[])
    s.add_argument("--prompts")
    s.add_argument("--model", dest="models", action="append", help="NAME=PATH or a diffusers folder (repeatable)")
    s.add_argument("--images-per-prompt", dest="images_per_prompt", type=positive_int)
    s.add_argument("--reward", dest="rewards", action="append", help="NAME[:WEIGHT] (repeatable)")
    s.add_argument("--out")
    for flag, typ in (("steps", positive_int), ("guidance", float), ("seed", int), ("batch-size", positive_int),
                      ("shard-size", positive_int), ("max-prompts", int), ("repeat-prompts", positive_int),
                      ("threads", int), ("eta", float)):
        s.add_argument(f"--{flag}", dest=flag.replace("-", "_"), type=typ)
    s.add_argument("--normalise", choices=("zscore", "rank", "none"))
    s.add_argument("--bf16", action="store_true", default=None, help="sample under bf16 autocast")
    s.add_argument("--pairs", choices=("best-worst", "all"))
    s.add_argument("--min-margin", dest="min_margin", type=float, help="pairs need this score gap at least")
    s.add_argument("--label-temperature", dest="label_temperature", type=float,
                   help="label pairs like a person: P(first chosen) = sigmoid(score gap / T) (Bradley-Terry)")
    s.add_argument("--overwrite", action="store_true", default=None,
                   help="start over when --out holds a dataset made with other settings (deletes it)")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_make_dataset, spellings=MAKE_DATASET_SPELLINGS)


def _add_world_parsers(sub) -> None:
    w = sub.add_parser("world", help="embedded worlds").add_subparsers(dest="world", required=True)
    shapes = w.add_parser("shapes", help="ShapesWorld").add_subparsers(dest="action", required=True)
    s = shapes.add_parser("pretrain", help="train the ShapesWorld base model")
    s.add_argument("-c", "--config", action="append", default=[], help="PretrainConfig YAML file(s)")
    s.add_argument("--out", required=True)
    s.add_argument("overrides", nargs="*", help="PretrainConfig key=value, e.g. steps=2400; prediction_type="
                   "epsilon|v_prediction|k (k-Diff: a generalised target, k=0 ε, 1 v, 2 x; learn_k=true learns it)")
    s.set_defaults(fn=cmd_world_pretrain)
    s = shapes.add_parser("features", help="train the ShapesWorld FID feature network")
    s.add_argument("--out", required=True)
    s.add_argument("--steps", type=positive_int, default=600)
    s.set_defaults(fn=cmd_world_features)
    s = shapes.add_parser("prompts", help="write a GenEval-format metadata file for a split")
    s.add_argument("--split", default="eval", choices=("train", "eval", "all"))
    s.add_argument("--per-task", type=int, default=0, help="N records per task, cycling the split's prompts")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_world_prompts)


def _add_run_tool_parsers(sub) -> None:
    """reward-server, diagnose, report and export-lora."""
    s = sub.add_parser("reward-server", help="serve a reward over HTTP (JSON + base64 PNG; no pickle)")
    s.add_argument("--reward", required=True, help="NAME[:WEIGHT][:key=value,...]")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.set_defaults(fn=cmd_reward_server, spellings=REWARD_FLAG_SPELLINGS)

    s = sub.add_parser("diagnose", help="where alignment lives: per-block weight delta and activation shift")
    s.add_argument("run_dir")
    s.add_argument("--baseline", help="another run folder, or 'random' (a random adapter of the same norm)")
    s.add_argument("--prompts", default="shapes:eval", help="probe prompts: a file, a dataset or shapes:eval")
    s.add_argument("--n-prompts", dest="n_prompts", type=positive_int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="where diagnose.json and diagnose.png go (default: RUN_DIR)")
    s.set_defaults(fn=cmd_diagnose)

    s = sub.add_parser("report", help="a self-contained report.html with curves, grids, metrics and config")
    s.add_argument("run_dir")
    s.add_argument("--baseline", help="another run (or eval) folder whose metrics to show beside")
    s.add_argument("--no-grid", action="store_true", help="skip the before/after sampling")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("export-lora", help="convert a visalign LoRA for ComfyUI / A1111 (Kohya keys)")
    s.add_argument("lora", help="a LoRA folder (pytorch_lora_weights.safetensors) or file")
    s.add_argument("--format", default="kohya", choices=("kohya",))
    s.add_argument("--out", required=True, help="output .safetensors file")
    s.add_argument("--family", help="the model family (sd, sdxl, sd3, flux); default: the run's config.yaml, "
                   "else the LoRA's keys")
    s.set_defaults(fn=cmd_export_lora)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visalign", description="Preference alignment for text-to-image diffusion.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="every registry entry (backbones, methods, heads, rewards)")
    s.set_defaults(fn=cmd_list)
    for name, fn, hlp in (("config", cmd_config, "print the resolved config and exit"),
                          ("finetune", cmd_finetune, "preference fine-tuning (any method, any backbone)")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("model", help="model preset: shapes | sd15 | sdxl | sd3 | flux | flux-schnell | pixart | sana")
        s.add_argument("-c", "--config", action="append", default=[], help="YAML config file (repeatable)")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4 objective.head=ipo")
        s.set_defaults(fn=fn)
    s = sub.add_parser("plan", help="will it fit? the run's memory by part and at 24/48/80 GB, before any weight "
                                    "loads (an estimate)")
    s.add_argument("model", help="model preset: shapes | sd15 | sdxl | sd3 | flux | qwenimage | ...")
    s.add_argument("-c", "--config", action="append", default=[], help="YAML config file (repeatable)")
    s.add_argument("--cache-complete", action="store_true",
                   help="the latent and text cache is complete: no text encoders or VAE in memory")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.quantize=int8")
    s.set_defaults(fn=cmd_plan)
    s = sub.add_parser("doctor", help="versions, device, bf16, SDPA and xformers")
    s.set_defaults(fn=cmd_doctor)

    _add_make_dataset_parser(sub)
    _add_score_pairs_parser(sub)
    _add_eval_parsers(sub)

    _add_world_parsers(sub)

    _add_run_tool_parsers(sub)

    s = sub.add_parser("demo", help="ShapesWorld end to end: data -> Diffusion-DPO -> GenEval before/after")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--quick", action="store_true", help="a tiny budget (for tests)")
    s.add_argument("--base", default="assets/shapes-base", help="the ShapesWorld base model folder to align")
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance of the data and the evaluation (default: the shipped base's best)")
    s.set_defaults(fn=cmd_demo)
    return p


def positive_int(text: str) -> int:
    """argparse type: a whole number > 0 (so `--samples-per-prompt 0` stops before any model loads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _route(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` words may stand anywhere after the command (``finetune shapes -c F k=v``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    """The one error boundary: a user's mistake is one ``error:`` line and exit 2; a bug keeps its traceback."""
    import traceback

    from .errors import UserError, os_error_line, spelling

    args = _route(argv)
    quiet_libraries()
    try:
        with spelling(getattr(args, "spellings", {})):
            args.fn(args)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or missing folder: the user's to fix, said in one line
        line = os_error_line(e)
        if line is None:
            return _bug(traceback)
        print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        return _bug(traceback)
    return 0


def _bug(traceback) -> int:
    traceback.print_exc()
    print("visalign: this is a bug, not a problem with your input; please report it with the command you ran "
          "and the traceback above.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
