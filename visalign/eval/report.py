"""`visalign report RUN_DIR`: a self-contained report.html (images embedded) plus PNG plots."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import torch

from ..files import read_jsonl, read_jsonl_counted

CURVES = (("loss", "loss"), ("implicit_acc", "implicit accuracy (h > 0)"), ("logit_mean", "mean logit h"),
          ("errors", "denoising errors"))


def _esc(value, spec: str = ".0f") -> str:
    """Any field read from a run's files as safe HTML text: a number in ``spec``, anything else escaped (a
    hand-edited or foreign JSON file can hold markup, or a string where a number belongs)."""
    if _is_number(value):
        return format(value, spec)
    return html.escape(str(value))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _jsonl(path: Path) -> list[dict]:
    return read_jsonl(path)


def plot_curves(rows: list[dict], out: Path, gold: list[dict]) -> list[Path]:
    """One PNG per curve (loss, implicit accuracy, mean logit, errors) and gold vs proxy when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list, list]:  # the rows that log this number (rows differ across methods)
        have = [r for r in rows if _is_number(r.get(key)) and _is_number(r.get("step"))]
        return [r["step"] for r in have], [r[key] for r in have]

    paths = []
    for key, title in CURVES:
        fig, ax = plt.subplots(figsize=(4.2, 2.8), dpi=100)
        if key == "errors":
            for k in ("err_w", "err_l", "ref_err_w", "ref_err_l"):
                if series(k)[0]:
                    ax.plot(*series(k), label=k, linestyle="--" if k.startswith("ref") else "-")
            ax.legend(fontsize=7)
        elif series(key)[0]:
            ax.plot(*series(key))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        fig.tight_layout()
        p = out / f"curve_{key}.png"
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)
    gold = [g for g in gold if _is_number(g.get("step")) and _is_number(g.get("gold"))]
    if gold:
        fig, ax = plt.subplots(figsize=(4.2, 2.8), dpi=100)
        ax.plot([g["step"] for g in gold], [g["gold"] for g in gold], label="gold", marker="o")
        if all(_is_number(g.get("proxy")) for g in gold):
            ax.plot([g["step"] for g in gold], [g["proxy"] for g in gold], label="proxy", marker="s")
        ax.set_title("reward-hacking guardrail: proxy vs gold", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / "curve_gold.png"
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)
    return paths


@torch.no_grad()
def before_after_grid(run: Path, cfg: dict, out: Path, prompts: list[str], seed: int = 0) -> Path | None:
    """Base vs tuned on the same prompts and seeds (rows: base, tuned)."""
    from ..models.load import for_sampling
    from .grid import image_grid, save_png

    model = cfg["model"]
    kwargs = {k: v for k, v in model.items() if k != "name"}
    steps, guidance = cfg["train"].get("sample_steps", 20), cfg["train"].get("guidance", 3.0)
    images = []
    for tuned in (False, True):
        if tuned and not ((run / "lora").exists() or (run / "model").exists()):
            return None
        full = tuned and not (run / "lora").exists()  # a full fine-tune saved its whole model
        bb = for_sampling(model["name"], str(run / "model") if full else kwargs.get("path", ""),
                          str(run / "lora") if tuned and not full else None,
                          **{k: v for k, v in kwargs.items() if k != "path"})
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(prompts), *bb.sample_shape), generator=gen)
        images += list(bb.sample(prompts, steps=steps, guidance=guidance, latents=noise).images.cpu())
    labels = [f"base: {p[11:] if p.startswith('a photo of') else p}" for p in prompts] + \
             [f"tuned: {p[11:] if p.startswith('a photo of') else p}" for p in prompts]
    return save_png(image_grid(images, labels, cols=len(prompts), scale=3, label_height=14), out / "before_after.png")


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def _winrate_tables(folder: Path) -> str:
    """Every winrate.json under ``folder`` (`visalign eval winrate`, the demo): the win rate and each term."""
    out = ""
    for f in sorted(folder.rglob("winrate.json")):
        w = json.loads(f.read_text())
        out += (f"<p><b>{html.escape(str(w.get('reward', 'reward')))} win rate</b> "
                f"({html.escape(str(f.parent.relative_to(folder)) or '.')}): {_esc(w['win_rate'], '.3f')} "
                f"[95% CI {_esc(w['ci_low'], '.3f')}, {_esc(w['ci_high'], '.3f')}] "
                f"over {_esc(w['n'])} paired samples</p>")
        if w.get("terms"):
            out += "<table><tr><th>term</th><th>base</th><th>tuned</th><th>paired change</th></tr>"
            for term, v in w["terms"].items():
                out += (f"<tr><td>{html.escape(term)}</td><td>{_esc(v['baseline'], '.3f')}</td>"
                        f"<td>{_esc(v['model'], '.3f')}</td>"
                        f"<td>{_esc(v['change'], '+.4f')} ± {_esc(v['se'], '.4f')}</td></tr>")
            out += "</table>"
    return out


def _metric_tables(run: Path) -> str:
    from .geneval import format_table

    found = {}
    for f in sorted(run.rglob("metrics.json")):
        m = json.loads(f.read_text())
        if "tasks" in m:
            found[str(f.parent.relative_to(run)) or "."] = m
    if not found:
        return "<p>No GenEval-style metrics under this run (run <code>visalign eval geneval</code>).</p>"
    rows = format_table(found).splitlines()
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    body = [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]
    out = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    for r in body:
        out += "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
    return out + "</table>"


def _diagnosis(run: Path) -> str:
    """`visalign diagnose`'s per-block plot and summary, when it has been run on this folder."""
    if not (run / "diagnose.json").exists() or not (run / "diagnose.png").exists():
        return ""
    result = json.loads((run / "diagnose.json").read_text())
    note = f"concentration of the added activation shift: {_esc(result['concentration'], '.3f')}"
    if "baseline" in result:
        b = result["baseline"]
        note += f"; baseline {html.escape(str(b['name']))}: {_esc(b['concentration'], '.3f')}"
    return f"<h2>Where alignment lives (visalign diagnose)</h2><p>{note}</p>{_img(run / 'diagnose.png')}"


def build_report(run_dir: str | Path, baseline: str | Path | None = None, prompts: list[str] | None = None,
                 grid: bool = True) -> Path:
    import yaml

    run = Path(run_dir)
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{run}: not a visalign run (no config.yaml)")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows, torn = read_jsonl_counted(run / "metrics.jsonl")
    if torn:  # a run killed mid-write: report what is whole, and say so
        print(f"{run / 'metrics.jsonl'}: {torn} incomplete line(s) dropped; the report shows the {len(rows)} "
              "complete ones")
    gold = _jsonl(run / "gold.jsonl")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    plots = plot_curves(rows, out, gold)
    prompts = prompts or cfg["train"].get("validation_prompts") or [
        "a photo of a red circle", "a photo of three squares", "a photo of a circle left of a square",
        "a photo of a blue triangle and a yellow circle"]
    ba = before_after_grid(run, cfg, out, prompts) if grid else None
    last = rows[-1] if rows else {}
    key_numbers = "".join(f"<tr><td>{html.escape(k)}</td><td>{_esc(v, '.4g')}</td></tr>" for k, v in last.items()
                          if isinstance(v, (int, float)))
    base_tables = (_winrate_tables(Path(baseline)) + _metric_tables(Path(baseline))) if baseline else ""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>visalign report</title><style>",
        "body{font-family:sans-serif;margin:24px;max-width:1100px} img{margin:4px;border:1px solid #ddd}",
        "table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}",
        "pre{background:#f6f6f6;padding:8px;font-size:12px;overflow:auto}</style></head><body>",
        f"<h1>visalign report: {html.escape(run.name)}</h1>",
        f"<p>method <b>{_esc(cfg['objective']['name'])}</b> on <b>{html.escape(str(cfg['model'].get('path')))}"
        f"</b>, {_esc(summary.get('steps', '?'))} steps, {_esc(summary.get('pairs_seen', '?'))} pairs seen, "
        f"{_esc(summary.get('seconds', '?'))} s</p>",
        "<h2>Metrics (accuracy ± standard error)</h2>", _metric_tables(run),
        f"<h3>Baseline</h3>{base_tables}" if baseline else "",
        "<h2>Final training metrics</h2><table>", key_numbers, "</table>",
        "<h2>Training curves</h2>", "".join(_img(p) for p in plots),
        "<h2>Before / after (same prompts and seeds)</h2>", _img(ba) if ba else "<p>(no trained weights)</p>",
        _diagnosis(run),
        "<h2>Config</h2><pre>", html.escape((run / "config.yaml").read_text()), "</pre>",
        "<h2>Summary and provenance</h2><pre>", html.escape(json.dumps(summary, indent=2)), "</pre>",
        "</body></html>"]
    page = run / "report.html"
    tmp = run / "report.html.tmp"
    tmp.write_text("".join(parts))
    tmp.replace(page)
    return page
