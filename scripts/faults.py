"""The fault suite: every fault of the trainer's contract, against the real CLI on tiny models, as a table.

    python scripts/faults.py [--fast] [--kills 3] [--seed 0] [--out runs/faults]

Faults (each run as `python -m visalign finetune ...` subprocesses):
- random-kill: SIGKILL at random moments (start-up, a step, a round's sampling, a checkpoint write), again and
  again, each time rerun with train.resume=latest_or_new; the finished weights must be bit-identical
  (summary.json's weights_sha256) to an uninterrupted run's. Every method kind: pairs (LoRA and full
  fine-tuning), lists, and the online rounds (grpo, disco, online_dpo, d3po, nft).
- torn-checkpoint: the newest checkpoint's file cut short; resume passes over it with one line and still
  ends bit-identical.
- two-writers: a second finetune on a run folder in use exits 2 naming the folder and the process.
- stale-lock: a lock left by a killed process is taken over.
- nan: a run whose loss turns non-finite stops with one line and writes no weights; with
  train.on_nonfinite=skip it finishes and counts the skipped steps.
- disk-full: a checkpoint write over a file-size limit (RLIMIT_FSIZE) ends with one line, the previous
  checkpoint stays complete, and resuming without the limit ends bit-identical.

A try "survived" when every command ended with exit 0 or 2 and one `error:` line (no traceback) and no
file was lost; "bit-identical" where the finished weights can be compared. --fast (in CI through
tests/test_faults.py) runs one pairs kind and one online kind with two kills each, and every other fault once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

COMMON = ["train.steps=6", "train.batch_size=2", "train.lr=1e-3", "train.save_every=2", "train.log_every=1",
          "train.threads=1", "train.tracker=none"]
# rounds of 3 steps against checkpoints every 2: a save falls mid-round, and a kill may too
ONLINE = ["data.path=shapes:train", "objective.prompts_per_round=2", "objective.round_steps=3",
          "objective.steps=3", "objective.reward=rater"]
KINDS: dict[str, list[str]] = {
    "pairs (diffusion_dpo, LoRA)": ["objective=diffusion_dpo", "data.path={pairs}"],
    "pairs (diffusion_dpo, full)": ["objective=diffusion_dpo", "data.path={pairs}", "lora.enabled=false"],
    "lists (rankdpo)": ["objective=rankdpo", "data.format=lists", "data.path={lists}"],
    "online (grpo)": ["objective=grpo", *ONLINE, "objective.group_size=2", "objective.window=2"],
    "online (disco)": ["objective=disco", *ONLINE, "objective.group_size=2", "objective.window=2"],
    "online (online_dpo)": ["objective=online_dpo", *ONLINE, "objective.samples_per_prompt=2",
                            "objective.min_margin=0"],
    "online (d3po)": ["objective=d3po", *ONLINE, "objective.min_margin=0"],
    "online (nft)": ["objective=nft", *ONLINE, "objective.group_size=2"],
}
FAST_KINDS = ("pairs (diffusion_dpo, LoRA)", "online (grpo)")


def cli(args: list[str], limit_bytes: int = 0) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def limit():
        os.setsid()
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.Popen([sys.executable, "-m", "visalign", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=limit)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def clean(code: int, out: str) -> bool:
    """Exit 0, or exit 2 with its last line an `error:` line; never a traceback."""
    return "Traceback" not in out and (code == 0 or (code == 2 and out.strip().splitlines()[-1].startswith("error:")))


def finetune(base: list[str], run: Path, *extra: str) -> list[str]:
    return ["finetune", "shapes", *base, f"train.output_dir={run}", *extra]


def digest(run: Path) -> str | None:
    f = run / "summary.json"
    return json.loads(f.read_text())["weights_sha256"] if f.exists() else None


class Suite:
    def __init__(self, out: Path, model: Path, data: dict[str, Path], rng: random.Random):
        self.out, self.model, self.data, self.rng = out, model, data, rng
        self.rows: list[dict] = []
        self.refs: dict[str, tuple[str, float]] = {}

    def base(self, kind: str) -> list[str]:
        return [f"model.path={self.model}", *COMMON,
                *(a.format(**{k: str(v) for k, v in self.data.items()}) for a in KINDS[kind])]

    def reference(self, kind: str) -> tuple[str, float]:
        """The uninterrupted run's weights digest and wall time."""
        if kind not in self.refs:
            run = self.out / "ref" / slug(kind)
            shutil.rmtree(run, ignore_errors=True)  # every suite run measures afresh
            t0 = time.time()
            code, text = finish(cli(finetune(self.base(kind), run)))
            if code != 0:
                raise SystemExit(f"reference run of {kind} failed:\n{text[-3000:]}")
            self.refs[kind] = (digest(run), time.time() - t0)
        return self.refs[kind]

    def record(self, fault: str, kind: str, tries: int, survived: bool, identical: bool | None, note: str = ""):
        self.rows.append({"fault": fault, "kind": kind, "tries": tries, "survived": survived,
                          "bit_identical": identical, "note": note})
        mark = "ok" if survived and identical is not False else "FAILED"
        print(f"  {fault:<16} {kind:<30} tries {tries:<3} {mark} {note}", flush=True)

    def random_kill(self, kind: str, kills: int) -> None:
        ref, wall = self.reference(kind)
        run = self.out / "kill" / slug(kind)
        args = finetune(self.base(kind), run, "train.resume=latest_or_new")
        made, ok, identical, attempts = 0, True, True, 0
        while made < kills and attempts < 4 * kills:
            attempts += 1
            proc = cli(args)
            time.sleep(self.rng.uniform(0.2, 0.8) * wall)
            if proc.poll() is not None:  # the resumed rest finished first: check it, then kill a fresh run
                ok &= clean(*finish(proc))
                identical &= digest(run) == ref
                shutil.rmtree(run)
                continue
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            made += 1
        code, text = finish(cli(args))
        ok &= code == 0 and clean(code, text) and made == kills
        identical &= digest(run) == ref
        self.record("random-kill", kind, made, ok, identical, f"({made} SIGKILLs)")
        self.kills = getattr(self, "kills", 0) + made

    def torn_checkpoint(self, kind: str) -> None:
        ref, _ = self.reference(kind)
        run = self.out / "torn" / slug(kind)
        finish(cli(finetune(self.base(kind), run, "train.steps=5")))  # checkpoints at steps 2 and 4
        newest = sorted((run / "checkpoints").glob("step-*"))[-1]
        victim = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        (run / "summary.json").unlink()  # as if the run had been killed after its last checkpoint
        code, text = finish(cli(finetune(self.base(kind), run, "train.resume=latest")))
        said = "passing over" in text and victim.name in text
        self.record("torn-checkpoint", kind, 1, code == 0 and clean(code, text) and said, digest(run) == ref,
                    "(newest checkpoint cut in half)")

    def two_writers(self, kind: str) -> None:
        run = self.out / "two" / slug(kind)
        long = "train.steps=100000"  # still training when the second writer comes
        first = cli(finetune(self.base(kind), run, long))
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        code, text = finish(cli(finetune(self.base(kind), run, long, "train.resume=latest_or_new")))
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        named = code == 2 and "in use by process" in text and str(first.pid) in text
        if not named:
            print(text[-2000:])
        self.record("two-writers", kind, 1, named and clean(code, text), None, "(second writer refused)")

    def stale_lock(self, kind: str) -> None:
        ref, _ = self.reference(kind)
        run = self.out / "stale" / slug(kind)
        run.mkdir(parents=True, exist_ok=True)
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (run / ".visalign.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename,
                                                        "since": time.time(), "command": "visalign finetune"}))
        code, text = finish(cli(finetune(self.base(kind), run)))
        self.record("stale-lock", kind, 1, code == 0 and "took over" in text and clean(code, text),
                    digest(run) == ref, "(lock of a dead process)")

    def nan(self, kind: str) -> None:
        run = self.out / "nan" / slug(kind)
        bad = ["train.lr=1e30", "train.max_grad_norm=0", "lora.init=true"]
        code, text = finish(cli(finetune(self.base(kind), run / "stop", *bad)))
        stopped = code == 2 and "non-finite" in text and not (run / "stop" / "lora").exists()
        code2, text2 = finish(cli(finetune(self.base(kind), run / "skip", *bad, "train.on_nonfinite=skip",
                                           "train.max_nonfinite=100", "train.steps=2")))
        skipped = code2 in (0, 2) and clean(code2, text2)
        self.record("nan", kind, 2, stopped and clean(code, text) and skipped, None,
                    "(stop at the first; skip and count)")

    def disk_full(self, kind: str) -> None:
        ref, _ = self.reference(kind)
        run = self.out / "disk" / slug(kind)
        finish(cli(finetune(self.base(kind), run, "train.steps=4")))
        (run / "summary.json").unlink()
        before = sorted(p.name for p in (run / "checkpoints").iterdir())
        biggest = max(p.stat().st_size for p in (run / "checkpoints" / before[-1]).rglob("*") if p.is_file())
        code, text = finish(cli(finetune(self.base(kind), run, "train.resume=latest"), limit_bytes=biggest // 2))
        said = code == 2 and "could not write" in text and clean(code, text)
        if not said:
            print(text[-1500:])
        from visalign.train.checkpoint import checkpoint_problem

        intact = sorted(p.name for p in (run / "checkpoints").iterdir()) == before and \
            checkpoint_problem(run / "checkpoints" / before[-1]) is None
        code2, text2 = finish(cli(finetune(self.base(kind), run, "train.resume=latest")))
        if not (said and intact and code2 == 0):
            print(said, intact, code2, before, sorted(p.name for p in (run / "checkpoints").iterdir()), text2[-800:])
        self.record("disk-full", kind, 1, said and intact and code2 == 0, digest(run) == ref,
                    "(RLIMIT_FSIZE below a checkpoint file)")

    def table(self) -> str:
        lines = ["| fault | method kind | tries | survived | bit-identical |", "|---|---|---|---|---|"]
        for r in self.rows:
            same = {True: "yes", False: "NO", None: "—"}[r["bit_identical"]]
            lines.append(f"| {r['fault']} | {r['kind']} | {r['tries']} | {'yes' if r['survived'] else 'NO'} | "
                         f"{same} |")
        return "\n".join(lines)


def slug(kind: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in kind).strip("-")


def setup(out: Path) -> tuple[Path, dict[str, Path]]:
    """The tiny pixel model, a pairs file and a ranked-lists file (random images, distinct scores)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from visalign.models.tiny import build_tiny

    model = out / "tiny-pixel"
    if not (model / "model_index.json").exists():
        build_tiny("pixel", model)
    rng = np.random.default_rng(0)

    def png() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    n = 8
    pairs, lists = out / "pairs.parquet", out / "lists.parquet"
    pq.write_table(pa.table({"caption": [f"a photo of {i % 3 + 1} red circles" for i in range(n)],
                             "jpg_0": [png() for _ in range(n)], "jpg_1": [png() for _ in range(n)],
                             "label_0": [float(i % 2) for i in range(n)]}), pairs)
    pq.write_table(pa.table({"prompt": [f"a photo of {i % 3 + 1} red circles" for i in range(n)],
                             "images": [[png() for _ in range(3)] for _ in range(n)],
                             "scores": [[3.0, 2.0, 1.0] for _ in range(n)]}), lists)
    return model, {"pairs": pairs, "lists": lists}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/faults")
    ap.add_argument("--fast", action="store_true", help="the CI part: two kinds, two kills each, each fault once")
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLs per method kind")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    for sub in ("ref", "kill", "torn", "two", "stale", "nan", "disk"):  # a rerun starts every fault afresh
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    model, data = setup(out)
    suite = Suite(out, model, data, random.Random(args.seed))
    kinds = FAST_KINDS if args.fast else tuple(KINDS)
    kills = 2 if args.fast else args.kills
    for kind in kinds:
        suite.random_kill(kind, kills)
    first = kinds[0]
    for fault in (suite.torn_checkpoint, suite.two_writers, suite.stale_lock, suite.nan, suite.disk_full):
        fault(first)
    text = suite.table()
    print(text)
    print(f"\n{getattr(suite, 'kills', 0)} SIGKILLs in all; "
          f"{sum(r['survived'] and r['bit_identical'] is not False for r in suite.rows)}/{len(suite.rows)} clean")
    (out / "faults.md").write_text(text + "\n")
    (out / "faults.json").write_text(json.dumps(suite.rows, indent=1))
    return suite.rows


if __name__ == "__main__":
    rows = main()
    sys.exit(0 if all(r["survived"] and r["bit_identical"] is not False for r in rows) else 1)
