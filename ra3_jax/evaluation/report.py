"""`ra3 report`: curves (PNG) and a Markdown table from run directories' metrics.jsonl.

Plots every run on shared axes (compare base / NTP-midtrained / RA3-midtrained starts of RLVR):
- ``pass_at_1.png``: eval pass@1 per benchmark vs RL step (``eval/<benchmark>/pass@1``);
- ``reward.png``: training reward (pass rate) vs step, with a moving average;
- ``loss.png``: training loss for NTP runs (``loss``), when present.
``report.md`` tabulates, per run, the first and last value and the best of each eval metric, and the final reward.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ra3_jax.errors import RA3Error


class ReportError(RA3Error, ValueError):
    pass


def read_metrics(run: str) -> list[dict]:
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        raise ReportError(f"{run}: no metrics.jsonl (is it a run directory, i.e. a train.out_dir?)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ReportError(f"{path}:{i}: corrupt line") from None
    if not rows:
        raise ReportError(f"{path} is empty")
    return rows


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted({r["step"]: r[key] for r in rows if key in r}.items())
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts], np.float64)


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    if len(y) < w or w < 2:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = [y[: i + 1].mean() for i in range(w - 1)]
    return np.concatenate([head, (c[w:] - c[:-w]) / w])


def write_report(runs: list[str], out: str, labels: list[str] | None = None) -> str:
    try:
        import matplotlib
    except ImportError:
        raise ReportError("ra3 report needs matplotlib: pip install 'ra3_jax[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [os.path.basename(os.path.normpath(r)) for r in runs]
    if len(labels) != len(runs):
        raise ReportError(f"{len(labels)} --label values for {len(runs)} runs")
    data = {lab: read_metrics(r) for lab, r in zip(labels, runs)}
    os.makedirs(out, exist_ok=True)
    eval_keys = sorted({k for rows in data.values() for r in rows for k in r if k.startswith("eval/") and k.endswith("pass@1")})
    written = []

    def figure(keys, fname, title, ylabel, smooth=1):
        panels = [k for k in keys if any(k in r for rows in data.values() for r in rows)]
        if not panels:
            return
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
        for ax, key in zip(axes[0], panels):
            for lab, rows in data.items():
                x, y = series(rows, key)
                if len(x):
                    ax.plot(x, _smooth(y, smooth), marker="o" if len(x) < 30 else None, label=lab)
            ax.set_title(key if len(panels) > 1 else title)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = os.path.join(out, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    figure(eval_keys, "pass_at_1.png", "pass@1", "pass@1")
    figure(["reward"], "reward.png", "reward (pass rate), moving average of 5", "reward", smooth=5)
    figure(["loss"], "loss.png", "training loss", "nats/token")

    lines = [
        "| run | steps | " + " | ".join(f"{k} (start -> last, best)" for k in eval_keys) + " | reward (last 10 steps) |",
        "|---|---:|" + "---|" * len(eval_keys) + "---:|",
    ]
    for lab, rows in data.items():
        cells = []
        for k in eval_keys:
            _, y = series(rows, k)
            cells.append(f"{100 * y[0]:.2f} -> {100 * y[-1]:.2f}, {100 * y.max():.2f}" if len(y) else "-")
        _, rew = series(rows, "reward")
        cells.append(f"{rew[-10:].mean():.3f}" if len(rew) else "-")
        lines.append(f"| {lab} | {max(r['step'] for r in rows)} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    md = ["# Run report", "", table, ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in written]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    return table
