"""`dcmdp report RUN_DIR [RUN_DIR ...]`: PNG plots and an HTML page comparing runs side by side.

Plots: reward, deployment-engine accuracy, discrepancy against the tolerance, the multiplier,
the token and sequence log ratios, and step time split by phase. Each run is one line, labelled by its directory name.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from pathlib import Path
from typing import Any

from dcmdp.checkpoint import read_metrics

PLOTS = [
    ("reward", "Training reward (mean)", [("train", "reward/mean")]),
    ("accuracy", "Deployment-engine accuracy (greedy)", [("eval", "eval/accuracy_greedy")]),
    ("discrepancy", "Mean probability gap D (dashed: tolerance c)", [("train", "discrepancy/prob_gap_mean")]),
    ("multiplier", "Lagrange multiplier lambda", [("train", "multiplier/lambda")]),
    ("abs_log_ratio", "Mean |log ratio| trainer vs engine", [("train", "discrepancy/abs_log_ratio_mean")]),
    (
        "seq_log_ratio",
        "Mean sequence log ratio, sum over tokens of log(pi/mu)",
        [("train", "discrepancy/seq_log_ratio_mean")],
    ),
]
TIME_KEYS = ["time/rollout", "time/recompute", "time/update", "time/dual", "time/sync"]


def _series(rows: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        if r.get("kind") == kind and key in r and r[key] is not None:
            value = float(r[key])
            if math.isfinite(value):
                xs.append(int(r["step"]))
                ys.append(value)
    return xs, ys


def _label(run: Path) -> str:
    # experiments/run.py lays runs out as <arm>/seed<k>: name them by their arm.
    if run.name.startswith("seed") and run.parent.name:
        return f"{run.parent.name}/{run.name}"
    return run.name if run.name else str(run)


def make_report(runs: list[Path], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    data = {}
    for run in runs:
        metrics = run / "metrics.jsonl"
        if not metrics.exists():
            raise FileNotFoundError(f"{run}: no metrics.jsonl (is this a dcmdp run directory?)")
        data[run] = read_metrics(metrics)
    images = []
    for name, title, series in PLOTS:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for i, (run, rows) in enumerate(data.items()):
            color = f"C{i % 10}"
            for kind, key in series:
                xs, ys = _series(rows, kind, key)
                if xs:
                    ax.plot(
                        xs, ys, color=color, label=_label(run), marker="o" if kind == "eval" else None, ms=3
                    )
            if name == "discrepancy":
                xs, cs = _series(rows, "train", "multiplier/tolerance")
                if xs:
                    ax.plot(xs, cs, color=color, linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        images.append((title, path.name))
    # Step time split by phase: one stacked bar per run (median over steps).
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    labels = []
    for i, (run, rows) in enumerate(data.items()):
        bottom = 0.0
        for j, key in enumerate(TIME_KEYS):
            _, ys = _series(rows, "train", key)
            value = sorted(ys)[len(ys) // 2] if ys else 0.0
            ax.bar(i, value, bottom=bottom, color=f"C{j}", label=key.split("/")[1] if i == 0 else None)
            bottom += value
        labels.append(_label(run))
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
    ax.set_ylabel("seconds per step (median)")
    ax.set_title("Step time by phase")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "step_time.png", dpi=110)
    plt.close(fig)
    images.append(("Step time by phase", "step_time.png"))
    page = out_dir / "index.html"
    page.write_text(_html(data, images))
    return page


def _summary_row(run: Path, rows: list[dict[str, Any]]) -> dict[str, str]:
    evals = [r for r in rows if r.get("kind") == "eval"]
    train = [r for r in rows if r.get("kind") == "train"]

    def fmt(v: Any, spec: str = ".3f") -> str:
        return format(v, spec) if isinstance(v, int | float) else "-"

    cfg = run / "config.yaml"
    loss = engine = "-"
    if cfg.exists():
        import yaml

        c = yaml.safe_load(cfg.read_text())
        loss = c["loss"]["type"]
        engine = f"{c['engine']['type']} {c['engine']['dtype']} {c['engine'].get('quantization') or ''}"
    return {
        "run": html.escape(_label(run)),
        "loss": html.escape(loss),
        "engine": html.escape(engine),
        "steps": str(len(train)),
        "acc before": fmt(evals[0]["eval/accuracy_greedy"]) if evals else "-",
        "acc after": fmt(evals[-1]["eval/accuracy_greedy"]) if evals else "-",
        "D first": fmt(train[0]["discrepancy/prob_gap_mean"], ".5f") if train else "-",
        "D last": fmt(train[-1]["discrepancy/prob_gap_mean"], ".5f") if train else "-",
        "lambda last": fmt(train[-1].get("multiplier/lambda_next"), ".4f") if train else "-",
        "s/step": fmt(sorted(r["time/step"] for r in train)[len(train) // 2], ".2f") if train else "-",
    }


def _html(data: dict[Path, list[dict[str, Any]]], images: list[tuple[str, str]]) -> str:
    rows = [_summary_row(run, r) for run, r in data.items()]
    head = "".join(f"<th>{k}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in row.values()) + "</tr>" for row in rows)
    figs = "".join(
        f'<figure><img src="{html.escape(src)}" alt="{html.escape(t)}"><figcaption>{html.escape(t)}</figcaption></figure>'
        for t, src in images
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>dcmdp report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} figure{{display:inline-block;margin:8px}}</style>
</head><body><h1>dcmdp runs</h1><table><tr>{head}</tr>{body}</table>{figs}</body></html>
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="PNG plots and an HTML page comparing runs")
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument(
        "--out", default=None, help="output directory (default: RUN_DIR/report for one run, else report/)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    runs = [Path(r) for r in args.runs]
    missing = [str(r) for r in runs if not (r / "metrics.jsonl").is_file()]
    if missing:  # before anything is written
        print(f"dcmdp report: no dcmdp run (metrics.jsonl) in: {', '.join(missing)}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (runs[0] / "report" if len(runs) == 1 else Path("runs/report"))
    try:
        page = make_report(runs, out)
    except OSError as exc:
        print(f"dcmdp report: cannot write the report to {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(json.dumps({"html": str(page), "images": sorted(p.name for p in out.glob("*.png"))}))
    return 0
