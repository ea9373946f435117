"""Faults: the checkpoint manifest, torn-checkpoint fallback, the run-folder lock and its take-over, resume
never moving backwards, and the fault suite's fast part (scripts/faults.py) against the real CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script

from visalign.errors import CheckpointError, UserError
from visalign.files import check_manifest, write_manifest
from visalign.run_lock import LOCK_FILE, FolderInUse, hold_folder
from visalign.train.checkpoint import find_resume
from visalign.train.loop import check_forward


def _checkpoint(root: Path, step: int, manifest: bool = True) -> Path:
    ckpt = root / "checkpoints" / f"step-{step:07d}"
    (ckpt / "lora").mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(os.urandom(256))
    (ckpt / "lora" / "pytorch_lora_weights.safetensors").write_bytes(os.urandom(64))
    (ckpt / "visalign_state.json").write_text(json.dumps({"step": step, "nonfinite": 0}))
    if manifest:
        write_manifest(ckpt)
    return ckpt


def test_manifest_names_a_missing_cut_or_altered_file(tmp_path):
    ckpt = _checkpoint(tmp_path, 2)
    assert check_manifest(ckpt) is None
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:100])
    assert "model.safetensors has 100 bytes" in check_manifest(ckpt)
    weights.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit flipped
    assert "model.safetensors does not match its sha256" in check_manifest(ckpt)
    weights.write_bytes(data)
    (ckpt / "lora" / "pytorch_lora_weights.safetensors").unlink()
    assert "pytorch_lora_weights.safetensors is missing" in check_manifest(ckpt)
    (ckpt / "manifest.json").write_text("{not json")
    assert "cannot be read" in check_manifest(ckpt)


def test_latest_passes_over_a_torn_newest_checkpoint_with_one_line(tmp_path, capsys):
    good = _checkpoint(tmp_path, 2)
    torn = _checkpoint(tmp_path, 4)
    w = torn / "model.safetensors"
    w.write_bytes(w.read_bytes()[:10])
    assert find_resume("latest", tmp_path) == good
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "passing over step-0000004" in err[0] and "model.safetensors" in err[0]
    with pytest.raises(CheckpointError, match="incomplete.*model.safetensors"):
        find_resume(str(torn), tmp_path)  # an explicit torn checkpoint is refused, never loaded
    g = good / "model.safetensors"
    g.write_bytes(g.read_bytes()[:10])
    for resume in ("latest", "latest_or_new"):
        with pytest.raises(CheckpointError, match="no complete checkpoint"):
            find_resume(resume, tmp_path)


def test_a_checkpoint_from_before_manifests_still_resumes(tmp_path):
    old = _checkpoint(tmp_path, 2, manifest=False)
    assert find_resume("latest", tmp_path) == old


def test_a_half_written_tmp_checkpoint_is_never_picked(tmp_path):
    good = _checkpoint(tmp_path, 2)
    (tmp_path / "checkpoints" / "step-0000004.tmp").mkdir()
    assert find_resume("latest", tmp_path) == good


def test_resume_never_moves_a_run_backwards(tmp_path):
    ckpt = _checkpoint(tmp_path, 4)
    check_forward(4, tmp_path, ckpt)
    with pytest.raises(UserError, match=r"train.steps=3 is below the 4 steps"):
        check_forward(3, tmp_path, ckpt)
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 8}))  # a finished run trained further
    with pytest.raises(UserError, match=r"train.steps=6 is below the 8 steps"):
        check_forward(6, tmp_path, ckpt)
    check_forward(8, tmp_path, ckpt)
    check_forward(1, tmp_path, None)  # nothing to resume: nothing to move back from


def test_lock_refuses_a_second_holder_naming_the_process(tmp_path):
    with hold_folder(tmp_path / "run", "train.output_dir"):
        holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
        code = ("import sys; from visalign.run_lock import hold_folder\n"
                f"with hold_folder({str(tmp_path / 'run')!r}, '--out'): pass")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode != 0 and "FolderInUse" in r.stderr and f"process {os.getpid()}" in r.stderr
        assert "--out=" in r.stderr
        with pytest.raises(FolderInUse, match="in use by process"):  # another open file description, same pid
            with hold_folder(tmp_path / "run", "train.output_dir"):
                pass
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released and removed
    with hold_folder(tmp_path / "run", "train.output_dir"):  # free again
        pass


def test_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    code = ("import os, signal; from visalign.run_lock import hold_folder\n"
            f"with hold_folder({str(run)!r}, 'train.output_dir'): os.kill(os.getpid(), signal.SIGKILL)")
    r = subprocess.run([sys.executable, "-c", code])
    assert r.returncode == -9 and (run / LOCK_FILE).exists()  # left behind by SIGKILL
    dead = json.loads((run / LOCK_FILE).read_text())["pid"]
    with hold_folder(run, "train.output_dir"):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert "took over the lock" in err and f"process {dead}" in err


def test_disabled_lock_holds_nothing(tmp_path):
    with hold_folder(tmp_path / "run", "train.output_dir", enabled=False):
        assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_fault_suite_fast_part_survives_every_fault(tmp_path):
    faults = load_script("faults")
    rows = faults.main(["--fast", "--out", str(tmp_path / "faults")])
    assert {r["fault"] for r in rows} == {"random-kill", "torn-checkpoint", "two-writers", "stale-lock", "nan",
                                          "disk-full"}
    bad = [r for r in rows if not r["survived"] or r["bit_identical"] is False]
    assert not bad, bad
    assert sum(r["tries"] for r in rows if r["fault"] == "random-kill") >= 2


# ---- the probe's classes: outputs that would destroy their input or foreign files; OS errors as one line ----

def _cli(argv, capsys) -> tuple[int, str]:
    from visalign.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_score_pairs_never_writes_onto_or_deletes_its_input(tmp_path, capsys):
    from helpers import write_pairs

    folder = tmp_path / "data"
    folder.mkdir()
    write_pairs(folder / "train.parquet", n=2)
    (folder / "notes.txt").write_text("mine")
    before = _files(folder)
    for out in (folder, folder / "scored", tmp_path):  # the input itself, inside it, holding it
        for extra in ([], ["--overwrite"]):
            code, err = _cli(["score-pairs", "--data", str(folder), "--reward", "rater", "--out", str(out), *extra],
                             capsys)
            assert code == 2 and "is, holds or lies inside the input --data" in err and "Traceback" not in err
    assert _files(folder) == before and not (folder / "scored").exists()


def test_score_pairs_overwrite_deletes_only_its_own_files(tmp_path, capsys):
    from helpers import write_pairs

    data = write_pairs(tmp_path / "p.parquet", n=2)
    out = tmp_path / "o"
    assert _cli(["score-pairs", "--data", str(data), "--reward", "rater", "--out", str(out)], capsys)[0] == 0
    (out / "keep.txt").write_text("not score-pairs'")
    code, _ = _cli(["score-pairs", "--data", str(data), "--reward", "shapes", "--out", str(out), "--overwrite"],
                   capsys)
    assert code == 0 and (out / "keep.txt").read_text() == "not score-pairs'"
    made = tmp_path / "made"
    made.mkdir()
    (made / "provenance.json").write_text(json.dumps({"models": [], "config": {}}))  # another command's folder
    (made / "data-00000.parquet").write_bytes(b"shard")
    code, err = _cli(["score-pairs", "--data", str(data), "--reward", "rater", "--out", str(made), "--overwrite"],
                     capsys)
    assert code == 2 and "did not write" in err and (made / "data-00000.parquet").read_bytes() == b"shard"


def test_export_lora_refuses_its_own_input(tmp_path, capsys):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"x" * 64)
    for out in (lora / "pytorch_lora_weights.safetensors", lora):
        code, err = _cli(["export-lora", str(lora), "--out", str(out)], capsys)
        assert code == 2 and "--out" in err and "Traceback" not in err
    assert (lora / "pytorch_lora_weights.safetensors").read_bytes() == b"x" * 64


def test_pretrain_never_replaces_a_folder_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, err = _cli(["world", "shapes", "pretrain", "--out", str(out), "steps=1"], capsys)
    assert code == 2 and "not a model folder pretrain wrote" in err
    assert (out / "thesis.tex").read_text() == "years of work"


def test_os_errors_are_one_line_naming_the_path(tmp_path, capsys):
    from helpers import write_pairs

    data = write_pairs(tmp_path / "p.parquet", n=2)
    a_file = tmp_path / "file"
    a_file.write_text("")
    for out in (a_file, a_file / "sub"):  # a file where the run folder should be, or above it
        code, err = _cli(["finetune", "shapes", f"data.path={data}", f"train.output_dir={out}", "train.steps=1"],
                         capsys)
        assert code == 2 and "Traceback" not in err and str(a_file) in err, err
        assert len(err.strip().splitlines()) == 1


def test_os_error_line_keeps_bugs_as_bugs():
    import errno

    from visalign.errors import os_error_line

    line = os_error_line(OSError(errno.ENOSPC, "No space left on device", "/data/run/x.safetensors"))
    assert line.startswith("/data/run/x.safetensors: No space left on device") and "free some space" in line
    assert os_error_line(OSError(errno.EBADF, "Bad file descriptor")) is None


# ---- the reward server, secrets and the score cache ----------------------------------------------------

class _Const:
    name, version = "const", "1"

    def __init__(self, value=0.5):
        self.value, self.calls = value, 0

    def __call__(self, images, prompts):
        import torch

        self.calls += len(images)
        return torch.full((len(images),), self.value)


def _serve(reward, **kw):
    import threading

    from visalign.rewards.server import make_server

    server = make_server(reward, "127.0.0.1", 0, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def _raw(port: int, data: bytes, read: bool = True) -> bytes:
    """Send raw bytes; the whole answer, read until the server closes."""
    import socket

    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(data)
    out = b""
    while read:
        chunk = s.recv(65536)
        out += chunk
        read = bool(chunk)
    s.close()
    return out


def test_reward_server_answers_bad_lengths_caps_connections_and_limits_pixels(monkeypatch):
    import base64
    import io
    import socket
    import time

    from PIL import Image

    import visalign.rewards.server as srv

    monkeypatch.setattr(srv, "READ_TIMEOUT", 1.0)
    server, port = _serve(_Const(), max_connections=2)
    try:
        for length in (b"abc", b"-5", b""):
            reply = _raw(port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n")
            assert reply.startswith(b"HTTP/1.0 400") or reply.startswith(b"HTTP/1.1 400"), reply[:60]
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]  # half-sent requests
        for h in held:
            h.sendall(b"POST /score HTTP/1.1\r\n")
        deadline = time.time() + 5
        while server.slots._value and time.time() < deadline:  # both accepted and waiting on their headers
            time.sleep(0.05)
        assert b"503" in _raw(port, b"GET / HTTP/1.1\r\n\r\n")  # over the cap: answered and closed
        time.sleep(1.5)  # the read timeout frees the held slots
        for h in held:
            h.close()
        buf = io.BytesIO()
        Image.new("RGB", (5000, 4000)).save(buf, format="PNG")  # a small file, a huge canvas
        body = json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()], "prompts": ["p"]}).encode()
        reply = _raw(port, b"POST /score HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert b" 400 " in reply.split(b"\r\n")[0] and b"pixels" in reply
    finally:
        server.shutdown()


def test_reward_server_token_and_secrets_only_over_https_or_localhost(monkeypatch):
    import torch

    from visalign.rewards.server import RemoteReward, RemoteRewardError, secret_destination

    server, port = _serve(_Const(0.25), token="s3cret")
    try:
        images = torch.rand(1, 3, 8, 8)
        monkeypatch.delenv("VISALIGN_REWARD_TOKEN", raising=False)
        with pytest.raises(RemoteRewardError, match="401.*bearer token"):
            RemoteReward(f"http://127.0.0.1:{port}")(images, ["p"])
        monkeypatch.setenv("VISALIGN_REWARD_TOKEN", "s3cret")
        assert RemoteReward(f"http://127.0.0.1:{port}")(images, ["p"]).tolist() == [0.25]
        with pytest.raises(UserError, match="neither https nor this machine"):
            RemoteReward("http://example.com:8765")(images, ["p"])  # refused before anything is sent
    finally:
        server.shutdown()
    assert secret_destination("https://api.example.com/v1", "K")
    assert secret_destination("http://localhost:8000/v1", "K")
    with pytest.raises(UserError, match="K is set"):
        secret_destination("http://10.0.0.5:8000/v1", "K")


def test_reward_server_on_another_host_warns(capsys, monkeypatch):
    from visalign.cli import main
    from visalign.rewards import server as srv

    def fake(reward, host, port, token=None):
        raise KeyboardInterrupt  # stands for Ctrl-C: the warning is printed before the server starts

    monkeypatch.setattr(srv, "make_server", fake)
    monkeypatch.delenv("VISALIGN_REWARD_TOKEN", raising=False)
    assert main(["reward-server", "--reward", "rater", "--host", "0.0.0.0"]) == 130
    err = capsys.readouterr().err
    assert "warning: --host 0.0.0.0" in err and "VISALIGN_REWARD_TOKEN" in err


def test_score_cache_key_covers_settings_and_refuses_nan(tmp_path):
    import torch

    from visalign.rewards.cache import CachedReward

    images, prompts = torch.rand(2, 3, 8, 8), ["a", "b"]
    a = CachedReward(_Const(0.5), tmp_path / "c.sqlite", {"size": 1.0})
    assert a(images, prompts).tolist() == [0.5, 0.5]
    b = CachedReward(_Const(0.7), tmp_path / "c.sqlite", {"size": 5.0})  # other arguments: scored afresh
    assert b(images, prompts).tolist() == pytest.approx([0.7, 0.7]) and b.reward.calls == 2
    again = CachedReward(_Const(0.9), tmp_path / "c.sqlite", {"size": 1.0})
    assert again(images, prompts).tolist() == [0.5, 0.5] and again.reward.calls == 0  # same settings: cached
    with pytest.raises(UserError, match="not a finite number"):
        CachedReward(_Const(float("nan")), tmp_path / "d.sqlite")(images, prompts)
    fresh = CachedReward(_Const(0.1), tmp_path / "d.sqlite")
    assert fresh(images, prompts).tolist() == pytest.approx([0.1, 0.1])  # nothing was cached by the NaN call
    fresh.db.execute("UPDATE scores SET score = NULL")  # an older cache's NaN, stored as NULL
    fresh.db.commit()
    assert CachedReward(_Const(0.3), tmp_path / "d.sqlite")(images, prompts).tolist() == pytest.approx([0.3, 0.3])


def test_an_in_place_parquet_edit_keeping_size_and_mtime_serves_the_new_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from visalign.data.pairs import load_any

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"caption": ["a"], "label_0": [0.0]}), path)
    assert load_any(str(path))["label_0"] == [0.0]
    st = path.stat()
    pq.write_table(pa.table({"caption": ["a"], "label_0": [1.0]}), path)  # same size, same schema
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime back
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert load_any(str(path))["label_0"] == [1.0]


@pytest.mark.parametrize("command", ["make-dataset", "score-pairs"])
def test_a_second_writer_of_a_data_folder_is_refused_naming_the_holder(command, tmp_path, capsys):
    from helpers import write_pairs

    out = tmp_path / "out"
    argv = {"make-dataset": ["make-dataset", "--prompts", "shapes:eval", "--max-prompts", "1", "--model",
                             "pixel=/nonexistent", "--reward", "shapes", "--out", str(out)],
            "score-pairs": ["score-pairs", "--data", str(write_pairs(tmp_path / "p.parquet", n=2)), "--reward",
                            "rater", "--out", str(out)]}[command]
    with hold_folder(out, "--out"):
        code, err = _cli(argv, capsys)
    assert code == 2 and "Traceback" not in err and str(out) in err and f"process {os.getpid()}" in err, err
    assert not list(out.iterdir())  # nothing written beside the holder (whose lock went with it)


def test_a_resume_after_an_upgrade_accepts_new_settings_at_their_defaults(tmp_path):
    import yaml

    from visalign.config import RunConfig
    from visalign.errors import CheckpointError
    from visalign.train.checkpoint import check_same_run

    now = json.loads(json.dumps(RunConfig().to_dict()))
    old = json.loads(json.dumps(now))
    del old["data"]["validation_fraction"]  # written by a visalign from before that setting
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    check_same_run(now, tmp_path, resuming=True)
    now["data"]["validation_fraction"] = 0.2  # the new setting changed: a different run
    with pytest.raises(CheckpointError, match="validation_fraction"):
        check_same_run(now, tmp_path, resuming=True)


def test_a_fixed_image_file_changes_the_cache_key_of_the_rows_that_name_it(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers import png

    from visalign.data.pairs import _image_files_stamp, load_any

    good = tmp_path / "good.png"
    good.write_bytes(png(np.zeros((8, 8, 3), np.uint8)))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not yet an image")
    pq.write_table(pa.Table.from_pylist([{"caption": "a", "jpg_0": str(good), "jpg_1": str(broken),
                                          "label_0": 1.0}]), tmp_path / "p.parquet")
    ds = load_any(str(tmp_path / "p.parquet"))
    before = _image_files_stamp(ds, "pairs")
    assert before and _image_files_stamp(ds, "pairs") == before  # stable while nothing changes
    broken.write_bytes(png(np.ones((8, 8, 3), np.uint8)))  # the file fixed, the parquet untouched
    assert _image_files_stamp(ds, "pairs") != before
    embedded = load_any(str(write_pairs_here(tmp_path)))
    assert _image_files_stamp(embedded, "pairs") == ""  # embedded bytes: the dataset's own fingerprint


def write_pairs_here(tmp_path):
    from helpers import write_pairs

    return write_pairs(tmp_path / "embedded.parquet", n=2)
