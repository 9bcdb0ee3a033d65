"""The chains experiment's report (/shared/design/CHAINS.md): tables, verdicts and plots from an experiment dir EXP.

EXP (marked by ``experiment.json``) holds ``results.jsonl`` (one row per seed, arm, mode, decoding and k) and the
RLVR runs ``seed{S}/rlvr_{start}/metrics.jsonl``; ``write_chains_report(EXP)`` writes ``report.md`` and the PNGs
``pass_by_k``, ``pass_by_k_sampled``, ``think_rate``, ``rlvr`` into it. Values are fractions on disk, percentages
(one decimal) in the report; "on k in {4,5,6}" is the n_tasks-weighted mean over those k of one seed's rows;
across seeds a cell is mean ± half-range, half-range = (max - min) / 2. Any subset of seeds and arms is reported.
"""

from __future__ import annotations

import glob
import json
import os
import re

from ra3_jax.evaluation.report import ReportError

ARMS = ("base", "ntp", "ntp_flops", "ra3", "random")
MODES = ("free", "forced", "banned")
DECODINGS = ("greedy", "t0.8")
HARD_KS, NTP_ARMS, RLVR_STARTS = (4, 5, 6), ("ntp", "ntp_flops"), ("base", "ntp", "ra3")
RLVR_PASS, RLVR_THINK = "eval/jsonl_eval/pass@1", "eval/jsonl_eval/think_rate"
RLVR_THRESHOLD, MARGIN = 0.5, 0.10  # MARGIN: (i) "beats by >= 10 points"; (ii) "well below RA3's free mode" = at least this far
LEVEL = 0.05  # (ii) "about NTP's level" = at most this many points above it
EPS = 1e-9
REQUIRED = {"seed": int, "arm": str, "mode": str, "decoding": str, "k": int, "pass@1": float}
KIND = {str: "a string", int: "an integer", float: "a number"}
FRACTIONS = ("pass@1", "pass@10", "think_rate", "step_acc")
THINK_COLUMNS = (("think_rate", "think rate"), ("step_acc", "step acc"))
LOOK = {"base": ("C7", "s"), "ntp": ("C0", "^"), "ntp_flops": ("C4", "v"), "ra3": ("C3", "o"), "random": ("C1", "D")}
PLOTS = (  # file, title, decoding (None: free mode, one panel per decoding; else one panel per mode), metrics, y label
    ("pass_by_k.png", "greedy pass@1 by chain length", "greedy", [("pass@1", "-")], "pass@1"),
    ("pass_by_k_sampled.png", "sampled (t=0.8) pass@1 and pass@10", "t0.8", [("pass@1", "-"), ("pass@10", "--")], "pass@k"),
    ("think_rate.png", "think rate in free mode", None, [("think_rate", "-")], "fraction of samples with a thought"),
)

Cells = dict[tuple[str, str, str, int], dict[int, dict]]  # (arm, mode, decoding, k) -> {seed: row}


def is_experiment_dir(path: str) -> bool:
    """True when ``path`` is a chains experiment directory (it holds ``experiment.json``)."""
    return os.path.isfile(os.path.join(path, "experiment.json"))


def _read_jsonl(path: str) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            try:
                row = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                raise ReportError(f"{path}:{i}: corrupt line")
            if row:
                rows.append((i, row))
    return rows


def _is_number(v, typ=float) -> bool:
    return not isinstance(v, bool) and isinstance(v, int if typ is int else (int, float))


def _check_row(where: str, row: dict) -> None:
    for key, typ in REQUIRED.items():
        if key not in row:
            raise ReportError(f"{where}: row has no {key!r} (required fields: {', '.join(REQUIRED)})")
        if not (isinstance(row[key], str) if typ is str else _is_number(row[key], typ)):
            raise ReportError(f"{where}: {key}={row[key]!r} is not {KIND[typ]}")
    for key, valid in (("arm", ARMS), ("mode", MODES), ("decoding", DECODINGS)):
        if row[key] not in valid:
            raise ReportError(f"{where}: unknown {key} {row[key]!r} (valid: {', '.join(valid)})")
    for key in FRACTIONS:
        v = row.get(key)
        if v is not None and (not _is_number(v) or not 0.0 <= v <= 1.0):
            raise ReportError(f"{where}: {key}={v!r} is not a fraction in [0, 1]")
    if row.get("n_tasks") is not None and not (_is_number(row["n_tasks"], int) and row["n_tasks"] > 0):
        raise ReportError(f"{where}: n_tasks={row['n_tasks']!r} is not a positive integer")


def load_results(exp: str) -> Cells:
    """``EXP/results.jsonl`` checked and indexed; a later row for the same measurement replaces an earlier one."""
    path = os.path.join(exp, "results.jsonl")
    if not os.path.isfile(path):
        raise ReportError(f"{exp}: no results.jsonl (has the chains experiment evaluated anything yet?)")
    cells: Cells = {}
    for i, row in _read_jsonl(path):
        _check_row(f"{path}:{i}", row)
        cells.setdefault((row["arm"], row["mode"], row["decoding"], row["k"]), {})[row["seed"]] = row
    if not cells:
        raise ReportError(f"{path} is empty")
    return cells


def load_rlvr(exp: str) -> dict[str, dict[int, list[tuple[int, float, float | None]]]]:
    """start -> seed -> [(step, eval pass@1, eval think rate or None)] from ``EXP/seed*/rlvr_*/metrics.jsonl``."""
    out: dict[str, dict[int, list]] = {}
    for d in sorted(glob.glob(os.path.join(exp, "seed*"))):
        m = re.fullmatch(r"seed(\d+)", os.path.basename(d))
        for start in RLVR_STARTS if m else ():
            path = os.path.join(d, f"rlvr_{start}", "metrics.jsonl")
            pts = {}
            for i, row in _read_jsonl(path) if os.path.isfile(path) else ():
                if row.get(RLVR_PASS) is None:
                    continue
                if not _is_number(row.get("step"), int) or not _is_number(row[RLVR_PASS]):
                    raise ReportError(f"{path}:{i}: an eval row needs an integer 'step' and a numeric {RLVR_PASS!r}")
                think = row.get(RLVR_THINK)
                pts[row["step"]] = (row["step"], float(row[RLVR_PASS]), think if _is_number(think) else None)
            if pts:
                out.setdefault(start, {})[int(m[1])] = [pts[s] for s in sorted(pts)]
    return out


def per_seed(cells: Cells, arm: str, mode: str, dec: str, metric: str, ks) -> dict[int, float]:
    """seed -> the n_tasks-weighted mean of ``metric`` over the rows with k in ``ks`` (None values skipped)."""
    acc: dict[int, list[float]] = {}
    for k in ks:
        for seed, row in cells.get((arm, mode, dec, k), {}).items():
            if row.get(metric) is not None:
                w = row.get("n_tasks") or 1
                s = acc.setdefault(seed, [0.0, 0.0])
                s[0], s[1] = s[0] + w * row[metric], s[1] + w
    return {seed: a / w for seed, (a, w) in sorted(acc.items())}


def _mean(by_seed: dict) -> float:
    return sum(by_seed.values()) / len(by_seed)


def _cell(by_seed: dict, n_row: int | None = None) -> str:
    """A table cell in percent: ``mean ± half-range`` (just the mean for one seed), ``(n=..)`` when n differs."""
    if not by_seed:
        return "–"
    vals = list(by_seed.values())
    txt = f"{100 * _mean(by_seed):.1f}" + (f" ± {50 * (max(vals) - min(vals)):.1f}" if len(vals) > 1 else "")
    return txt if n_row in (None, len(vals)) else f"{txt} (n={len(vals)})"


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """A Markdown table framed by blank lines (so it renders); the first ``left`` columns left-aligned."""
    if not rows:
        return ["", "_no data_", ""]
    sep = ["---"] * left + ["---:"] * (len(header) - left)
    line = lambda cells: "| " + " | ".join(cells) + " |"
    return ["", line(header), "|" + "|".join(sep) + "|", *(line(r) for r in rows), ""]


def _present(cells: Cells) -> tuple[list[str], list[str], list[int]]:
    arms = [a for a in ARMS if any(key[0] == a for key in cells)]
    modes = [m for m in MODES if any(key[1] == m for key in cells)]
    return arms, modes, sorted({key[3] for key in cells})


def _seeds(cells: Cells, arm: str | None = None) -> list[int]:
    return sorted({s for key, by in cells.items() if arm in (None, key[0]) for s in by})


def _headline(cells: Cells) -> list[str]:
    arms, modes, _ = _present(cells)
    cell = lambda arm, mode, n: _cell(per_seed(cells, arm, mode, "greedy", "pass@1", HARD_KS), n)
    rows = [[arm, str(n)] + [cell(arm, m, n) for m in modes] for arm in arms for n in [len(_seeds(cells, arm))]]
    return _table(["arm", "n seeds", *modes], rows)


def _arm_mode_table(cells: Cells, columns: list[tuple[str, str, str, tuple]]) -> list[str]:
    """Rows arm × mode (those with any value); columns (header, decoding, metric, ks)."""
    arms, modes, _ = _present(cells)
    rows = []
    for arm in arms:
        n = len(_seeds(cells, arm))
        for mode in modes:
            vals = [per_seed(cells, arm, mode, dec, metric, ks) for _, dec, metric, ks in columns]
            if any(vals):
                rows.append([arm, mode, str(n)] + [_cell(v, n) for v in vals])
    return _table(["arm", "mode", "n seeds"] + [c[0] for c in columns], rows, left=2)


def _every_seed(parts: list[dict], ok) -> str:
    """'holds for every seed (n/n)' or 'holds for m/n seeds': ``ok(values...)`` on the seeds all ``parts`` have."""
    seeds = sorted(set.intersection(*(set(p) for p in parts)))
    hits = sum(bool(ok(*(p[s] for p in parts))) for s in seeds)
    return f"holds for every seed ({hits}/{len(seeds)})" if hits == len(seeds) > 0 else f"holds for {hits}/{len(seeds)} seeds"


def _verdict_i(cells: Cells) -> str:
    ra3 = per_seed(cells, "ra3", "free", "greedy", "pass@1", HARD_KS)
    rivals = {f"{a} {m}": per_seed(cells, a, m, "greedy", "pass@1", HARD_KS) for a in NTP_ARMS for m in MODES}
    rivals = {name: v for name, v in rivals.items() if v}
    if not ra3 or not rivals:
        return "- (i) **n.a.** — needs greedy rows on k 4..6 for RA3 free mode and for an NTP arm (ntp, ntp_flops)."
    best = max(rivals, key=lambda name: _mean(rivals[name]))
    gap = _mean(ra3) - _mean(rivals[best])
    verdict = "PASS" if gap >= MARGIN - EPS else "FAIL"
    best_by_seed = {s: max(v[s] for v in rivals.values() if s in v) for s in set().union(*rivals.values())}
    seeds = _every_seed([ra3, best_by_seed], lambda r, b: r - b >= MARGIN - EPS)
    return (
        f"- (i) **{verdict}** — RA3 free {100 * _mean(ra3):.1f}% vs the best NTP arm and mode ({best}) "
        f"{100 * _mean(rivals[best]):.1f}%: {100 * gap:+.1f} points (>= {100 * MARGIN:.0f} needed); "
        f"per seed, against that seed's best NTP arm and mode, it {seeds}."
    )


def _verdict_ii(cells: Cells) -> str:
    free, banned = (per_seed(cells, "ra3", m, "greedy", "pass@1", HARD_KS) for m in ("free", "banned"))
    ntp = per_seed(cells, "ntp", "banned", "greedy", "pass@1", HARD_KS)
    if not free or not banned or not ntp:
        return "- (ii) **n.a.** — needs greedy rows on k 4..6 for RA3 free, RA3 banned and NTP banned."
    level, drop = _mean(banned) - _mean(ntp), _mean(free) - _mean(banned)
    # "falls to about NTP's level": no better than NTP without thoughts (below it shows the same), well below free
    ok = lambda f, b, n: b - n <= LEVEL + EPS and f - b >= MARGIN - EPS
    verdict = "PASS" if ok(_mean(free), _mean(banned), _mean(ntp)) else "FAIL"
    return (
        f"- (ii) **{verdict}** — RA3 banned {100 * _mean(banned):.1f}% vs NTP banned {100 * _mean(ntp):.1f}%: "
        f"gap {100 * level:+.1f} points (<= +{100 * LEVEL:.0f} needed: at or below about NTP's level); "
        f"RA3 free {100 * _mean(free):.1f}% is "
        f"{100 * drop:.1f} points above RA3 banned (>= {100 * MARGIN:.0f} needed); "
        f"it {_every_seed([free, banned, ntp], ok)}."
    )


def _verdict_iii(cells: Cells) -> str:
    ra3, rnd = (per_seed(cells, a, "free", "greedy", "pass@1", HARD_KS) for a in ("ra3", "random"))
    if not ra3 or not rnd:
        return "- (iii) **n.a.** — needs greedy free-mode rows on k 4..6 for RA3 and random acceptance."
    gap = _mean(ra3) - _mean(rnd)
    return (
        f"- (iii) **{'PASS' if gap > EPS else 'FAIL'}** — RA3 free {100 * _mean(ra3):.1f}% vs random acceptance "
        f"free {100 * _mean(rnd):.1f}%: {100 * gap:+.1f} points; it {_every_seed([ra3, rnd], lambda a, b: a - b > EPS)}."
    )


def _rlvr_row(runs: dict[int, list]) -> list[str]:
    step0 = {s: p[0][1] for s, p in runs.items() if p[0][0] == 0}
    last = {s: p[-1][1] for s, p in runs.items()}
    last_steps = sorted({p[-1][0] for p in runs.values()})
    best = {s: max(v for _, v, _ in p) for s, p in runs.items()}
    hits = {s: [st for st, v, _ in p if v >= RLVR_THRESHOLD - EPS] for s, p in runs.items()}
    first = {s: h[0] for s, h in hits.items() if h}
    reach = f"{sum(first.values()) / len(first):.0f} ({len(first)}/{len(runs)} seeds)" if first else "never"
    think = {s: p[-1][2] for s, p in runs.items() if p[-1][2] is not None}
    steps = str(last_steps[0]) if len(last_steps) == 1 else f"{last_steps[0]}–{last_steps[-1]}"
    return [str(len(runs)), _cell(step0), steps, _cell(last), _cell(best), reach, _cell(think)]


def _rlvr_table(rlvr: dict) -> list[str]:
    thr = f"first step >= {100 * RLVR_THRESHOLD:.0f}%"
    header = ["start", "n seeds", "step 0", "last step", "last", "max", thr, "think rate (last)"]
    return _table(header, [[start] + _rlvr_row(rlvr[start]) for start in RLVR_STARTS if start in rlvr])


def _figure(ncols: int, title: str):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("the chains report needs matplotlib: pip install 'ra3_jax[report]'") from None
    fig = Figure(figsize=(4.4 * ncols + 1.6, 3.9), dpi=120, layout="constrained")
    fig.suptitle(title)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _band(ax, xs, by_x: list[dict], arm: str, label: str | None, style: str = "-") -> bool:
    """Mean over seeds as a line, min-max over seeds as a shaded band; False when there is nothing to draw.
    Hollow markers of a distinct shape per arm keep lines that lie on top of each other (think rate 0) apart."""
    pts = [(x, list(d.values())) for x, d in zip(xs, by_x) if d]
    if not pts:
        return False
    x = [p[0] for p in pts]
    color, marker = LOOK[arm]
    ax.plot(x, [sum(v) / len(v) for _, v in pts], style, color=color, marker=marker, mfc="none", ms=6, lw=1.5, label=label)
    if any(len(v) > 1 for _, v in pts):
        ax.fill_between(x, [min(v) for _, v in pts], [max(v) for _, v in pts], color=color, alpha=0.15, lw=0)
    return True


def _style(ax, title: str, xlabel: str, ylabel: str, xs=None) -> None:
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, ylim=(-0.03, 1.03), **({"xticks": list(xs)} if xs else {}))
    ax.grid(alpha=0.3)


def _save(fig, exp: str, name: str, extra_handles=()) -> str:
    """One legend for the figure (right of the panels), then the PNG."""
    legend = {}
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    legend.update((h.get_label(), h) for h in extra_handles)
    fig.legend(list(legend.values()), list(legend), loc="outside right center", fontsize="small")
    path = os.path.join(exp, name)
    fig.savefig(path)
    return path


def _plot_by_k(exp: str, cells: Cells, name: str, title: str, panels: list, metrics: list, ylabel: str) -> str | None:
    """One panel per (panel title, mode, decoding), x = k, one line per arm and metric (metric, line style)."""
    from matplotlib.lines import Line2D

    arms, _, ks = _present(cells)
    fig, axes = _figure(len(panels), title)
    drawn = False
    for ax, (panel, mode, dec) in zip(axes, panels):
        for arm in arms:
            for metric, style in metrics:
                by_k = [per_seed(cells, arm, mode, dec, metric, (k,)) for k in ks]
                drawn |= _band(ax, ks, by_k, arm, arm, style)
        _style(ax, panel, "k (ops in the chain)", ylabel, ks)
    keys = [Line2D([], [], color="black", ls=s, label=m) for m, s in metrics] if len(metrics) > 1 else []
    return _save(fig, exp, name, keys) if drawn else None


def _plot_rlvr(exp: str, rlvr: dict) -> str:
    fig, axes = _figure(1, "RLVR: eval pass@1 (greedy, free mode)\nmean over seeds, band = min-max")
    for start in (s for s in RLVR_STARTS if s in rlvr):
        runs = {seed: {st: v for st, v, _ in pts} for seed, pts in rlvr[start].items()}
        steps = sorted({st for r in runs.values() for st in r})
        by_step = [{seed: r[st] for seed, r in runs.items() if st in r} for st in steps]
        _band(axes[0], steps, by_step, start, f"from {start} ({len(runs)} seeds)")
    _style(axes[0], "", "RLVR step", "eval pass@1")
    axes[0].axhline(RLVR_THRESHOLD, color="black", lw=0.8, ls=":", label=f"{100 * RLVR_THRESHOLD:.0f}% (the table's threshold)")
    return _save(fig, exp, "rlvr.png")


def write_chains_plots(exp: str, cells: Cells, rlvr: dict) -> list[str]:
    """The PNGs (those with data) written into ``exp``; their paths."""
    paths, modes = [], _present(cells)[1]
    for name, title, dec, metrics, ylabel in PLOTS:
        panels = [(f"{m} mode", m, dec) for m in modes] if dec else [(f"{d} decoding", "free", d) for d in DECODINGS]
        paths.append(_plot_by_k(exp, cells, name, f"{title} (mean over seeds, band = min-max)", panels, metrics, ylabel))
    return [p for p in [*paths, _plot_rlvr(exp, rlvr) if rlvr else None] if p]


def _read_experiment(exp: str) -> dict:
    """``experiment.json`` (the planned seeds and arms), {} when absent."""
    path = os.path.join(exp, "experiment.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            planned = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ReportError(f"{path}: corrupt JSON") from None
    return planned if isinstance(planned, dict) else {}


def _intro(exp: str, cells: Cells, rlvr: dict) -> list[str]:
    (seeds, (arms, modes, ks)), planned = (_seeds(cells), _present(cells)), _read_experiment(exp)
    join = lambda xs: ", ".join(map(str, xs))
    lines = ["# Chains benchmark report", "", f"Experiment `{os.path.abspath(exp)}`.", ""]
    lines += [
        f"- seeds with results: {join(seeds)} (n = {len(seeds)})",
        f"- arms: {join(arms)}; modes: {join(modes)}; k: {join(ks)}",
    ]
    for key, have in (("seeds", seeds), ("arms", arms)):
        if missing := [x for x in planned.get(key) or [] if x not in have]:
            lines.append(f"- planned in experiment.json but without results: {key} {join(missing)}")
    lines.append(f"- RLVR runs: {join(f'{s} ({len(rlvr[s])} seeds)' for s in rlvr) or 'none'}")
    spread = "Numbers are percentages. A cell is **mean ± half-range over seeds** (half-range = (max - min) / 2;"
    return lines + ["", f"{spread} one seed: the value alone); `(n=..)` marks a cell with fewer seeds than its row."]


def _markdown(exp: str, cells: Cells, rlvr: dict, plots: list[str]) -> list[str]:
    hard, n = "k in {4,5,6} (n_tasks-weighted mean over k per seed)", len(_seeds(cells))
    md = _intro(exp, cells, rlvr)
    md += ["", "## Headline", "", f"Greedy pass@1 on {hard}, by arm and inference mode, mean ± half-range over seeds."]
    md += _headline(cells)
    md += ["## What counts (CHAINS.md)", "", f"Greedy pass@1 on {hard}, comparing means over seeds."]
    if n < 3:
        md += ["", f"CHAINS.md asks for >= 3 seeds; this experiment has {n}, so read these as provisional."]
    md += ["", _verdict_i(cells), _verdict_ii(cells), _verdict_iii(cells), ""]
    by_k = [(f"k={k}", "greedy", "pass@1", (k,)) for k in _present(cells)[2]]
    md += ["## Greedy pass@1 by k", "", "Mean ± half-range over seeds, per k."] + _arm_mode_table(cells, by_k)
    sampled = [(f"{m} (k 4..6)", "t0.8", m, HARD_KS) for m in ("pass@1", "pass@10")]
    md += ["## Sampled (t=0.8)", "", f"pass@1 and pass@10 at temperature 0.8 on {hard}, mean ± half-range over seeds."]
    md += _arm_mode_table(cells, sampled)
    allk = tuple(_present(cells)[2])
    think = [(f"{name} {d}", d, metric, allk) for metric, name in THINK_COLUMNS for d in DECODINGS]
    md += ["## Thinking", "", "Think rate: the fraction of samples that wrote a `# thought:` line; step acc: the fraction"]
    md += ["of written thought steps that are correct (in forced mode, the arithmetic's accuracy); over all k."]
    md += _arm_mode_table(cells, think)
    if rlvr:
        md += ["## RLVR", "", f"Eval pass@1 (`{RLVR_PASS}`) per start; step 0 is the start model. Mean ± half-range"]
        md += ["over seeds of each seed's value; the first step reaching the threshold is a mean over the seeds reaching it."]
        md += _rlvr_table(rlvr)
    md += ["## Plots"] + [line for p in plots for line in ("", f"![{os.path.basename(p)}]({os.path.basename(p)})")]
    return md


def write_chains_report(exp_dir: str) -> str:
    """Writes ``report.md`` and the PNGs into the chains experiment directory ``exp_dir``; returns report.md's text."""
    if not os.path.isdir(exp_dir):
        raise ReportError(f"{exp_dir}: no such experiment directory")
    cells, rlvr = load_results(exp_dir), load_rlvr(exp_dir)
    plots = write_chains_plots(exp_dir, cells, rlvr)
    text = "\n".join(_markdown(exp_dir, cells, rlvr, plots)) + "\n"
    path = os.path.join(exp_dir, "report.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return text
