"""benchmarks/gpu_check.sh --dry-run: the device check's mechanics on CPU (tiny shapes), so the script that runs
on a lent accelerator is known to work before a device minute is spent on it."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_writes_every_section(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as on the GPU machine
    p = subprocess.run(
        ["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.load(open(tmp_path / "gpu_check.json"))
    assert res["dry_run"] and res["backend"] == "cpu"
    for impl in ("xla", "blocked"):
        row = res["train"][impl]
        assert row["tokens_per_s"] > 0 and 0 < row["mfu_vs_measured_ceiling"] < 2 and row["mfu_vs_peak"] is None
    assert res["decode"]["batch_2"]["tokens_per_s"] > 0 and res["decode"]["batch_4"]["fraction_of_roofline"] is None
    e = res["estep"]
    assert e["round_seconds"] > 0 and e["generated_tokens"] > 0 and e["scored_tokens"] > 0 and e["docs"] == 4
    assert (
        abs(e["propose_seconds"] + e["score_seconds"] + e["update_seconds"] - e["round_seconds"])
        < 0.05 * e["round_seconds"] + 0.01
    )
