"""The chains experiment report (ra3_jax/evaluation/chains_report.py) on synthetic experiment directories: the
headline and RLVR numbers against hand-computed means, the "What counts" verdicts, tables that render, valid
PNGs, partial experiments, and one-line errors naming the path and line."""

import json
import re

import pytest

from ra3_jax.evaluation.chains_report import ARMS, MODES, is_experiment_dir, write_chains_report
from ra3_jax.evaluation.report import ReportError

# Greedy pass@1 on k 4..6 per (arm, mode), the mean over seeds and k. Each k adds K_OFFSET[k], each seed
# SEED_OFFSET[seed] (both average to 0), so the headline cell is exactly this value ± 2.0.
HARD = {
    ("base", "free"): 0.12, ("base", "forced"): 0.40, ("base", "banned"): 0.13,
    ("ntp", "free"): 0.14, ("ntp", "forced"): 0.45, ("ntp", "banned"): 0.14,
    ("ntp_flops", "free"): 0.15, ("ntp_flops", "forced"): 0.48, ("ntp_flops", "banned"): 0.15,
    ("ra3", "free"): 0.60, ("ra3", "forced"): 0.62, ("ra3", "banned"): 0.25,
    ("random", "free"): 0.30, ("random", "forced"): 0.50, ("random", "banned"): 0.16,
}  # fmt: skip
K_OFFSET = {1: 0.2, 2: 0.1, 3: 0.05, 4: 0.03, 5: 0.0, 6: -0.03}
SEED_OFFSET = {0: -0.02, 1: 0.02}
# RLVR eval pass@1 per start and seed at steps 0, 10, 20, 30
RLVR = {
    "base": {0: [0.10, 0.15, 0.20, 0.25], 1: [0.12, 0.18, 0.22, 0.30]},
    "ntp": {0: [0.15, 0.30, 0.45, 0.50], 1: [0.15, 0.25, 0.40, 0.44]},
    "ra3": {0: [0.30, 0.45, 0.55, 0.60], 1: [0.32, 0.50, 0.60, 0.62]},
}


def _rows(hard, seeds, arms):
    for seed in seeds:
        for arm in arms:
            for mode in MODES:
                for k in range(1, 7):
                    p = min(1.0, hard[arm, mode] + K_OFFSET[k] + SEED_OFFSET.get(seed, 0.0))
                    think = {"forced": 1.0, "banned": 0.0}.get(mode, 0.9 if arm == "ra3" else 0.0)
                    acc = 0.8 if mode == "forced" else (0.7 if think else None)
                    base = {"seed": seed, "arm": arm, "mode": mode, "k": k, "n_tasks": 100, "step_acc": acc}
                    yield {**base, "decoding": "greedy", "pass@1": p, "pass@10": None, "think_rate": think}
                    t_think = {"forced": 1.0, "banned": 0.0}.get(mode, 0.95 if arm == "ra3" else 0.4)
                    yield {**base, "decoding": "t0.8", "pass@1": p - 0.05, "pass@10": min(1.0, p + 0.2), "think_rate": t_think}


def make_exp(path, hard=HARD, seeds=(0, 1), arms=ARMS, rlvr=RLVR):
    path.mkdir(parents=True, exist_ok=True)
    (path / "experiment.json").write_text(json.dumps({"seeds": list(seeds), "arms": list(arms)}, indent=1))
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(hard, seeds, arms)))
    for start, by_seed in rlvr.items():
        for seed, vals in by_seed.items():
            run = path / f"seed{seed}" / f"rlvr_{start}"
            run.mkdir(parents=True)
            lines = []
            for i, v in enumerate(vals):
                lines.append({"step": 10 * i, "eval/jsonl_eval/pass@1": v, "eval/jsonl_eval/think_rate": 0.5})
                lines.append({"step": 10 * i + 5, "reward": 0.3, "loss": 1.0})
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(path)


def table_row(md, *first_cells):
    """The cells of the (first) table row whose leading cells are ``first_cells``."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[: len(first_cells)] == list(first_cells):
            return cells
    raise AssertionError(f"no table row {first_cells}")


def section(md, title):
    return md.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def verdict(md, num):
    m = re.search(rf"^- \({num}\) \*\*(PASS|FAIL|n\.a\.)\*\*", md, re.M)
    assert m, f"no verdict line ({num})"
    return m[1]


def assert_tables_render(md):
    """Every table: a header, a separator row, no blank line inside, the same number of cells on each row."""
    blocks, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            blocks.append(cur)
            cur = []
    assert blocks
    for b in blocks:
        assert len(b) >= 3 and re.fullmatch(r"\|(-{3,}:?\|)+", b[1]), b[:2]
        assert len({line.count("|") for line in b}) == 1, b
    assert "nan" not in md.lower()


def assert_png(path, min_bytes=5000):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes, (path, len(data))


def test_full_experiment(tmp_path):
    exp = make_exp(tmp_path / "exp")
    assert is_experiment_dir(exp) and not is_experiment_dir(str(tmp_path))
    md = write_chains_report(exp)
    assert open(f"{exp}/report.md", encoding="utf-8").read() == md
    assert_tables_render(md)
    head = section(md, "Headline")
    for arm in ARMS:
        row = table_row(head, arm)
        assert row[1] == "2"
        for mode, cell in zip(MODES, row[2:]):
            assert cell == f"{100 * HARD[arm, mode]:.1f} ± 2.0", (arm, mode, cell)
    # (i) RA3 free 60.0 vs the best NTP arm and mode (ntp_flops forced, 48.0): +12.0 >= 10 on the means and per seed
    assert verdict(md, "i") == "PASS" and "ntp_flops forced" in md and "+12.0 points" in md
    assert "holds for every seed (2/2)" in md
    # (ii) RA3 banned 25.0 vs NTP banned 14.0: 11 points apart, more than 5
    assert verdict(md, "ii") == "FAIL" and "gap +11.0 points" in md
    # (iii) RA3 free 60.0 vs random 30.0
    assert verdict(md, "iii") == "PASS" and "+30.0 points" in md
    assert "CHAINS.md asks for >= 3 seeds" in md
    # by k: ra3 free k=4 is 60 + 3 = 63.0 (± 2.0); sampled pass@1 = greedy - 5, pass@10 = greedy + 20
    assert table_row(section(md, "Greedy pass@1 by k"), "ra3", "free")[3:] == [
        f"{100 * min(1, 0.60 + K_OFFSET[k]):.1f} ± 2.0" for k in range(1, 7)
    ]
    assert table_row(section(md, "Sampled"), "ra3", "free")[3:] == ["55.0 ± 2.0", "80.0 ± 2.0"]
    # thinking: think greedy, think t0.8, step acc greedy, step acc t0.8
    assert table_row(section(md, "Thinking"), "ra3", "free")[3:] == ["90.0 ± 0.0", "95.0 ± 0.0", "70.0 ± 0.0", "70.0 ± 0.0"]
    assert table_row(section(md, "Thinking"), "ntp", "forced")[3:] == ["100.0 ± 0.0", "100.0 ± 0.0", "80.0 ± 0.0", "80.0 ± 0.0"]
    assert table_row(section(md, "Thinking"), "ntp", "banned")[5:] == ["–", "–"]
    _check_rlvr(section(md, "RLVR"))
    for name in ("pass_by_k.png", "pass_by_k_sampled.png", "think_rate.png", "rlvr.png"):
        assert_png(f"{exp}/{name}")
        assert f"![{name}]({name})" in md


def _check_rlvr(rl):
    # columns: start, n seeds, step 0, last step, last, max, first step >= 50%, think rate (last)
    assert table_row(rl, "ra3") == ["ra3", "2", "31.0 ± 1.0", "30", "61.0 ± 1.0", "61.0 ± 1.0", "15 (2/2 seeds)", "50.0 ± 0.0"]
    assert table_row(rl, "ntp")[2:7] == ["15.0 ± 0.0", "30", "47.0 ± 3.0", "47.0 ± 3.0", "30 (1/2 seeds)"]
    assert table_row(rl, "base")[6] == "never"


def test_verdicts_flip(tmp_path):
    hard = {**HARD, ("ntp_flops", "forced"): 0.55, ("ra3", "banned"): 0.17, ("random", "free"): 0.65}
    md = write_chains_report(make_exp(tmp_path / "exp", hard=hard, rlvr={}))
    assert verdict(md, "i") == "FAIL" and "+5.0 points" in md and "holds for 0/2 seeds" in md
    assert verdict(md, "ii") == "PASS" and "gap +3.0 points" in md and "43.0 points above" in md
    assert verdict(md, "iii") == "FAIL" and "-5.0 points" in md
    assert "## RLVR" not in md


def test_partial_experiment(tmp_path):
    exp = make_exp(tmp_path / "exp", seeds=(3,), arms=("base", "ra3"), rlvr={})
    (tmp_path / "exp" / "experiment.json").write_text(json.dumps({"seeds": [3, 4], "arms": list(ARMS)}))
    md = write_chains_report(exp)
    assert_tables_render(md)
    assert [verdict(md, n) for n in ("i", "ii", "iii")] == ["n.a."] * 3
    assert table_row(section(md, "Headline"), "ra3")[1:] == ["1", "60.0", "62.0", "25.0"]
    assert "without results: seeds 4" in md and "without results: arms ntp, ntp_flops, random" in md
    assert "RLVR runs: none" in md
    for name in ("pass_by_k.png", "pass_by_k_sampled.png", "think_rate.png"):
        assert_png(f"{exp}/{name}")
    assert not (tmp_path / "exp" / "rlvr.png").exists()


def test_greedy_only_and_missing_cells(tmp_path):
    """No sampled rows and a seed with fewer measurements: (n=1) marks the thinner cell; no sampled plot."""
    exp = tmp_path / "exp"
    make_exp(exp, rlvr={})
    rows = [json.loads(x) for x in (exp / "results.jsonl").read_text().splitlines()]
    keep = [r for r in rows if r["decoding"] == "greedy" and not (r["seed"] == 1 and r["arm"] == "ra3" and r["mode"] == "banned")]
    (exp / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    md = write_chains_report(str(exp))
    assert_tables_render(md)
    assert table_row(section(md, "Headline"), "ra3")[4] == "23.0 (n=1)"
    assert not (exp / "pass_by_k_sampled.png").exists() and (exp / "pass_by_k.png").exists()


def _break(exp, line_no, edit):
    path = f"{exp}/results.jsonl"
    lines = open(path, encoding="utf-8").read().splitlines()
    lines[line_no - 1] = edit(lines[line_no - 1])
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda line: line[:-3], "corrupt line"),
        (lambda line: line.replace('"ra3"', '"ra4"'), "unknown arm 'ra4' (valid: base, ntp, ntp_flops, ra3, random)"),
        (lambda line: line.replace('"free"', '"thinking"'), "unknown mode 'thinking' (valid: free, forced, banned)"),
        (lambda line: json.dumps({k: v for k, v in json.loads(line).items() if k != "k"}), "row has no 'k'"),
        (lambda line: line.replace('"pass@1": ', '"pass@1": 7'), "is not a fraction in [0, 1]"),
        (lambda line: line.replace('"seed": 0', '"seed": "0"'), "seed='0' is not an integer"),
    ],
)
def test_bad_results_line(tmp_path, edit, message):
    exp = make_exp(tmp_path / "exp", rlvr={})
    # line 109 = seed 0, arm ra3 (the 4th arm: 3 arms * 36 rows before it), mode free, k 1, greedy
    path = _break(exp, 109, edit)
    assert json.loads(open(path).read().splitlines()[0])["arm"] == "base"
    with pytest.raises(ReportError, match=re.escape(f"{path}:109: ")) as e:
        write_chains_report(exp)
    assert message in str(e.value)


def test_missing_inputs(tmp_path):
    with pytest.raises(ReportError, match="no such experiment directory"):
        write_chains_report(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no results.jsonl"):
        write_chains_report(str(tmp_path / "empty"))
    (tmp_path / "empty" / "results.jsonl").write_text("\n")
    with pytest.raises(ReportError, match="is empty"):
        write_chains_report(str(tmp_path / "empty"))


def test_corrupt_rlvr_metrics(tmp_path):
    exp = make_exp(tmp_path / "exp")
    path = tmp_path / "exp" / "seed1" / "rlvr_ntp" / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 40, "eval/jsonl_eval/pass@1": \n')
    with pytest.raises(ReportError, match=re.escape(f"{path}:9: corrupt line")):
        write_chains_report(exp)


def test_banned_below_ntp_counts_as_causal(tmp_path):
    """(ii) is one-sided: RA3 without its thoughts falling BELOW NTP (to the no-thinking level) passes; a RA3
    banned mode more than 5 points above NTP's does not."""
    below = {**HARD, ("ntp", "banned"): 0.30, ("ra3", "banned"): 0.22}
    md = write_chains_report(make_exp(tmp_path / "below", hard=below, rlvr={}))
    assert verdict(md, "ii") == "PASS" and "gap -8.0 points" in md
    above = {**HARD, ("ntp", "banned"): 0.30, ("ra3", "banned"): 0.38}
    md = write_chains_report(make_exp(tmp_path / "above", hard=above, rlvr={}))
    assert verdict(md, "ii") == "FAIL" and "gap +8.0 points" in md
