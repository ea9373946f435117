"""The bad-input corpus: every careless input ends in one clean ``error:`` line (exit 2), names the key, file
or flag at fault, prints no traceback, and leaves every earlier output as it was.

Each case builds its inputs in ``tmp_path`` and returns the command line and the words the message must
contain. Cases that must stop before a model loads point ``--model`` at a folder that does not exist: the
message then proves which check came first.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import png, write_pairs

from visalign.cli import main

MISSING = "/nonexistent/model"


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    return code, capsys.readouterr().err


def _finetune(tiny, data, out, *extra) -> list[str]:
    return ["finetune", "shapes", f"model.path={tiny}", f"data.path={data}", f"train.output_dir={out}",
            "train.steps=2", "train.batch_size=2", "train.save_every=1", "train.log_every=1", "train.threads=1",
            "train.tracker=none", "train.lr=1e-3", *extra]


def _make_dataset(model, out, *extra) -> list[str]:
    return ["make-dataset", "--prompts", "shapes:eval", "--max-prompts", "2", "--images-per-prompt", "2",
            "--model", f"pixel={model}", "--reward", "shapes", "--steps", "2", "--threads", "1", "--out", str(out),
            *extra]


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _geneval(meta, model=MISSING, *extra) -> list[str]:
    return ["eval", "geneval", "--model", str(model), "--metadata", str(meta), "--steps", "2",
            "--samples-per-prompt", "1", "--out", "OUT", *extra]


# --- the cases: name -> (tmp, tiny model dir) -> (argv, words the message must contain) ----------------

def case_lr_nan(t, m):
    return ["config", "shapes", "train.lr=nan"], ["train.lr", "finite"]


def case_lr_huge_negative(t, m):
    return ["config", "shapes", "train.lr=-1"], ["train.lr", "positive"]


def case_batch_size_zero(t, m):
    return ["config", "shapes", "train.batch_size=0"], ["train.batch_size"]


def case_lora_rank_zero(t, m):
    return ["config", "shapes", "lora.rank=0"], ["lora.rank"]


def case_lora_init_unknown(t, m):
    return ["config", "shapes", "lora.init=default"], ["lora.init", "gaussian"]


def case_prompt_dropout_above_one(t, m):
    return ["config", "shapes", "train.prompt_dropout=2"], ["train.prompt_dropout"]


def case_stray_positional(t, m):
    return ["config", "shapes", "junk"], ["junk"]


def case_yaml_list(t, m):
    f = _write(t / "list.yaml", "- a\n- b\n")
    return ["make-dataset", "-c", str(f), "--out", str(t / "o")], [str(f), "mapping"]


def case_yaml_python_tag(t, m):
    f = _write(t / "tag.yaml", "prompts: !!python/object/apply:os.system ['echo pwned']\n")
    return ["make-dataset", "-c", str(f), "--out", str(t / "o")], [str(f), "YAML"]


def case_yaml_unknown_key(t, m):
    f = _write(t / "k.yaml", "images_per_promt: 3\n")
    return ["make-dataset", "-c", str(f), "--out", str(t / "o")], ["images_per_promt", "images_per_prompt"]


def case_real_config_without_data(t, m):
    config = str(Path(__file__).resolve().parents[1] / "configs" / "sd15" / "dpo.yaml")
    return (["finetune", "sd15", "-c", config, "model.path=/nowhere/sd15"],
            ["data.path is empty", "streaming", "make-dataset"])


def case_score_pairs_without_reward(t, m):
    return ["score-pairs", "--data", str(t / "p.parquet"), "--out", str(t / "o")], ["--reward"]


def case_finetune_config_file_missing(t, m):
    return ["finetune", "shapes", "-c", str(t / "none.yaml"), "train.lr=1e-4"], ["none.yaml"]


def case_empty_prompts_file(t, m):
    f = _write(t / "empty.txt", "\n\n")
    return _make_dataset(MISSING, t / "o", "--prompts", str(f)), ["--prompts", "no prompts"]


def case_prompts_invalid_utf8(t, m):
    f = _write(t / "bad.txt", b"a photo of a red circle\n\xff\xfe\xfa\n")
    return _make_dataset(MISSING, t / "o", "--prompts", str(f)), ["--prompts", "UTF-8"]


def case_prompts_bad_json_line(t, m):
    f = _write(t / "p.jsonl", '{"prompt": "a photo of a circle"}\n{broken\n')
    return _make_dataset(MISSING, t / "o", "--prompts", str(f)), ["--prompts", "line 2"]


def case_prompts_unknown_split(t, m):
    return _make_dataset(MISSING, t / "o", "--prompts", "shapes:test"), ["--prompts", "shapes:test"]


def case_images_per_prompt_zero(t, m):
    return _make_dataset(MISSING, t / "o", "--images-per-prompt", "0"), ["--images-per-prompt"]


def case_shard_size_zero(t, m):
    return _make_dataset(MISSING, t / "o", "--shard-size", "0"), ["--shard-size"]


def case_reward_weight_not_a_number(t, m):
    return _make_dataset(MISSING, t / "o", "--reward", "shapes:abc"), ["--reward", "shapes:abc"]


def case_reward_weights_sum_to_zero(t, m):
    argv = _make_dataset(MISSING, t / "o")
    argv[argv.index("shapes")] = "shapes:0"
    return argv, ["--reward", "shapes:0", "sum to 0"]


def case_reward_unknown(t, m):
    return _make_dataset(MISSING, t / "o", "--reward", "shapez"), ["shapez", "did you mean 'shapes'"]


def case_shapes_reward_on_foreign_prompt(t, m):
    f = _write(t / "cats.txt", "a photo of a cat\n")
    return _make_dataset(MISSING, t / "o", "--prompts", str(f)), ["a photo of a cat", "not a ShapesWorld caption"]


def case_winrate_foreign_prompt(t, m):
    f = _write(t / "cats.txt", "a photo of a cat\n")
    return ["eval", "winrate", "--model", MISSING, "--baseline", MISSING, "--reward", "shapes", "--prompts", str(f),
            "--out", str(t / "w")], ["a photo of a cat"]


def case_winrate_pickscore_weights_missing(t, m):
    return ["eval", "winrate", "--model", MISSING, "--baseline", MISSING, "--reward",
            f"pickscore:1:model={t / 'no-pickscore'}", "--prompts", "shapes:eval", "--out", str(t / "w")], \
        ["--reward pickscore:1:model="]


def case_geneval_zero_samples(t, m):
    return ["eval", "geneval", "--model", MISSING, "--samples-per-prompt", "0", "--out", str(t / "g")], \
        ["--samples-per-prompt"]


def case_geneval_malformed_metadata(t, m):
    f = _write(t / "meta.jsonl", '{"tag": "single_object", "prompt": "a photo of a circle", '
                                 '"include": [{"class": "circle", "count": 1}]}\nnot json\n')
    return _geneval(f), [f"{f}:2", "not valid JSON"]


def case_geneval_clause_without_count(t, m):
    f = _write(t / "meta.jsonl", '{"tag": "single_object", "prompt": "x", "include": [{"class": "circle"}]}\n')
    return _geneval(f), [f"{f}:1", "count"]


def case_geneval_unknown_class_before_load(t, m):
    f = _write(t / "meta.jsonl", json.dumps({"tag": "single_object", "prompt": "a photo of a dog",
                                             "include": [{"class": "dog", "count": 1}]}) + "\n")
    return _geneval(f), ["'dog'", "--detector owlv2"]


def case_fid_empty_prompts(t, m):
    f = _write(t / "empty.txt", "")
    return ["eval", "fid", "--model", MISSING, "--real", "shapes:eval", "--n", "4", "--prompts", str(f), "--out",
            str(t / "f")], ["--prompts", "no prompts"]


def case_eval_pickle_only_model(t, m):
    import torch
    from safetensors.torch import load_file

    pickled = t / "pickled"
    shutil.copytree(m, pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), pickled / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    return _geneval(_write(t / "meta.jsonl", ""), pickled)[:4] + ["--steps", "2", "--out", str(t / "g")], \
        ["--model", "pickle"]


def case_eval_truncated_lora(t, m):
    f = _write(t / "lora.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    return ["eval", "geneval", "--model", str(m), "--lora", str(f), "--steps", "2", "--samples-per-prompt", "1",
            "--out", str(t / "g")], [str(f)]


def case_export_lora_text_file(t, m):
    f = _write(t / "notes.txt", "not weights")
    return ["export-lora", str(f), "--out", str(t / "k.safetensors")], [str(f), "safetensors"]


def case_export_lora_base_weights(t, m):
    f = m / "unet" / "diffusion_pytorch_model.safetensors"
    return ["export-lora", str(f), "--out", str(t / "k.safetensors")], [str(f), "no LoRA weights"]


def case_resume_latest_without_checkpoint(t, m):
    data = write_pairs(t / "pairs.parquet", n=4)
    return _finetune(m, data, t / "run", "train.resume=latest"), ["train.resume=latest", "latest_or_new"]


def case_weighting_without_scores(t, m):
    data = write_pairs(t / "pairs.parquet", n=4)
    return _finetune(m, data, t / "run", "data.weighting=margin"), ["score_0"]


def case_finetune_missing_data(t, m):
    return _finetune(m, t / "nowhere.parquet", t / "run"), ["data.path", "nowhere.parquet"]


def case_fid_n_cannot_fit(t, m):
    return ["eval", "fid", "--model", str(m), "--real", "shapes:eval", "--n", str(10**13), "--steps", "2",
            "--out", str(t / "f")], ["--n", "GiB", "smaller"]


def case_model_resolution_beyond_any_model(t, m):
    return ["config", "sd15", "model.resolution=100000"], ["model.resolution=100000", "16384"]


def case_eval_out_is_a_file_before_sampling(t, m):
    f = _write(t / "taken.txt", "a file, not a folder")
    return ["eval", "winrate", "--model", str(m), "--baseline", str(m), "--reward", "shapes", "--prompts",
            "shapes:eval", "--out", str(f / "w")], ["--out", "cannot write"]


def case_image_cell_names_a_fifo(t, m):
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    fifo = t / "images" / "fifo.png"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)  # a read of it would block for ever
    good = _write(t / "images" / "good.png", png(np.zeros((32, 32, 3), np.uint8)))
    rows = [{"caption": "a photo of a red circle", "jpg_0": str(fifo), "jpg_1": str(good), "label_0": 1.0}]
    pq.write_table(pa.Table.from_pylist(rows), t / "fifo.parquet")
    return _finetune(m, t / "fifo.parquet", t / "run", "data.on_error=raise"), [str(fifo), "not a regular file"]


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clean_line(name, tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    earlier = _write(tmp_path / "earlier" / "output.txt", "an earlier run's output\n")
    argv, words = CASES[name](tmp_path, tiny_dir("pixel"))
    before = _snapshot(tmp_path)
    code, err = _run(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error:" in last
    for word in words:
        assert word in last, f"{word!r} not in {last!r}"
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing earlier changed or went
    assert earlier.read_text() == "an earlier run's output\n"


# --- cases that need an earlier output first -------------------------------------------------------------

def test_make_dataset_refuses_other_settings_then_overwrites(tiny_dir, tmp_path, capsys):
    import pyarrow.parquet as pq

    out, model = tmp_path / "ds", tiny_dir("pixel")
    assert main(_make_dataset(model, out)) == 0
    before = _snapshot(out)
    code, err = _run(_make_dataset(model, out, "--images-per-prompt", "3", "--max-prompts", "3"), capsys)
    assert code == 2 and "Traceback" not in err
    assert "images_per_prompt: 2 there, 3 now" in err and "max_prompts" in err and "--overwrite" in err
    assert _snapshot(out) == before  # no shard added, provenance not rewritten
    assert main(_make_dataset(model, out)) == 0  # the same settings continue (nothing to do)
    assert _snapshot(out) == before
    assert main(_make_dataset(model, out, "--images-per-prompt", "3", "--max-prompts", "3", "--overwrite")) == 0
    rows = [r for f in sorted(out.glob("data-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 3 and {len(r["images"]) for r in rows} == {3}
    assert json.loads((out / "provenance.json").read_text())["images_per_prompt"] == 3


@pytest.fixture(scope="module")
def trained_run(tiny_dir, tmp_path_factory):
    """A 2-step run with a checkpoint at each step."""
    root = tmp_path_factory.mktemp("run")
    data = write_pairs(root / "pairs.parquet", n=4)
    assert main(_finetune(tiny_dir("pixel"), data, root / "run")) == 0
    return root, data


def test_truncated_checkpoint_is_one_line_and_rewrites_nothing(tiny_dir, trained_run, tmp_path, capsys):
    root, data = trained_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    (run / "summary.json").unlink()
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    weights = next(ckpt.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    before = _snapshot(run)
    code, err = _run(_finetune(tiny_dir("pixel"), data, run, "train.resume=latest", "train.steps=3"), capsys)
    assert code == 2 and "Traceback" not in err and str(ckpt) in err, err
    assert _snapshot(run) == before  # config.yaml and metrics.jsonl untouched


def test_resume_with_other_settings_refuses(tiny_dir, trained_run, tmp_path, capsys):
    root, data = trained_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    before = _snapshot(run)
    code, err = _run(_finetune(tiny_dir("pixel"), data, run, "train.resume=latest", "train.lr=5e-4"), capsys)
    assert code == 2 and "train.lr: 0.001 there, 0.0005 now" in err, err
    code, err = _run(_finetune(tiny_dir("pixel"), data, run), capsys)  # a fresh run over a finished one
    assert code == 2 and "already holds a run" in err and "train.resume=latest" in err, err
    assert _snapshot(run) == before


def test_non_finite_run_stops_with_one_line(tiny_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.parquet", n=4)
    code, err = _run(_finetune(tiny_dir("pixel"), data, tmp_path / "run", "train.lr=1e30", "train.max_nonfinite=2",
                               "train.steps=6", "train.on_nonfinite=skip", "train.max_grad_norm=0",
                               "lora.init=true"), capsys)
    assert code == 2 and "Traceback" not in err
    assert "consecutive non-finite" in err.strip().splitlines()[-1]


def test_on_error_raise_is_not_served_by_a_skip_mode_cache(tiny_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.parquet", n=4, labels=[1, 0, 1, 0], corrupt_rows=(1,))
    assert main(_finetune(tiny_dir("pixel"), data, tmp_path / "skip", "train.save_every=0")) == 0
    code, err = _run(_finetune(tiny_dir("pixel"), data, tmp_path / "raise", "data.on_error=raise"), capsys)
    assert code == 2 and "row 1: corrupt image" in err, err


def test_report_reads_a_killed_runs_torn_metrics_line(trained_run, tmp_path, capsys):
    root, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.6')  # what a kill mid-write leaves
    assert main(["report", str(run), "--no-grid"]) == 0
    assert (run / "report.html").exists()


def test_resume_drops_a_torn_line_and_rows_after_the_checkpoint(tmp_path):
    from visalign.files import read_jsonl, trim_jsonl

    log = _write(tmp_path / "metrics.jsonl", '{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    trim_jsonl(log, lambda r: r["step"] <= 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert read_jsonl(log) == [{"step": 1}, {"step": 2}]


def test_reward_server_answers_a_bad_caption_and_keeps_serving():
    import threading
    import urllib.error
    import urllib.request

    import torch

    from visalign.rewards.server import RemoteReward, RemoteRewardError, encode_images, make_server
    from visalign.worlds.shapes.reward import ShapesReward

    server = make_server(ShapesReward(), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        body = json.dumps({"images": encode_images(torch.rand(1, 3, 16, 16)), "prompts": ["a photo of a cat"]})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(f"{url}/score", data=body.encode()), timeout=30)
        assert e.value.code == 422 and "a photo of a cat" in json.loads(e.value.read())["error"]
        with pytest.raises(RemoteRewardError, match="answered 422: .*not a ShapesWorld caption"):
            RemoteReward(url)(torch.rand(1, 3, 16, 16), ["a photo of a cat"])
        assert RemoteReward(url)(torch.rand(2, 3, 16, 16), ["a photo of a circle", "a square"]).shape == (2,)
    finally:
        server.shutdown()
