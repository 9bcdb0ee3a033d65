"""The one host loop (train/loop.py) and the one update core (train/step.py), against hand-computed schedules
and a plain one-shot gradient."""

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ra3_jax.errors import TrainingError
from ra3_jax.train import loop as loop_mod
from ra3_jax.train.loop import Loop, MetricsWriter, StopLoop, run_loop
from ra3_jax.train.state import TrainState
from ra3_jax.train.step import Objective, update_step


def _count(state, step):
    return state + 1, {"loss": float(step), "grad_norm": 1.0, "tokens": 10.0}


def test_cadences_resume_and_metrics(tmp_path):
    saved, evals = [], []
    writer = MetricsWriter(str(tmp_path), 0)
    lp = Loop(
        "t",
        0,
        7,
        str(tmp_path),
        writer,
        log_every=3,
        eval_every=4,
        ckpt_every=5,
        progress=False,
        evaluate=lambda s, k: evals.append(k) or {"eval/x": float(k)},
        save=lambda s, k: saved.append((k, s)),
        lr_at=lambda k: 0.1 * k,
        extra={"iteration": 2},
    )
    state, last = run_loop(lp, 0, _count)
    writer.close()
    assert state == 7 and saved == [(5, 5), (7, 7)] and evals == [4, 7]
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [3, 5, 6, 7]  # log steps, checkpoint steps and the last step
    assert train_rows[0]["lr"] == pytest.approx(0.3) and train_rows[0]["iteration"] == 2
    assert [r["step"] for r in rows if "eval/x" in r] == [4, 7]
    assert last["loss"] == 7.0 and last["eval/x"] == 7.0 and last["tokens_per_s"] > 0
    # resumed from step 5: the loop runs 6..7 only, and the writer drops rows after the resume step
    writer = MetricsWriter(str(tmp_path), 5)
    seen = []
    run_loop(Loop("t", 5, 7, str(tmp_path), writer, progress=False), 5, lambda s, k: (seen.append(k) or s + 1, {"loss": 0.0}))
    writer.close()
    assert seen == [6, 7]
    steps = [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")]
    assert steps == [3, 4, 5, 6, 7]  # 3, 4 (eval) and 5 kept; 6, 7 rewritten once


def test_stop_loop_and_nan_guard(tmp_path):
    def stops(state, step):
        if step == 3:
            raise StopLoop("data exhausted")
        return _count(state, step)

    assert run_loop(Loop("t", 0, 10, str(tmp_path), progress=False), 0, stops)[0] == 2
    saved = []

    def nan_at_4(state, step):
        return state + 1, {"loss": float("nan") if step == 4 else 1.0, "grad_norm": 1.0}

    lp = Loop("t", 0, 6, str(tmp_path), ckpt_every=2, progress=False, save=lambda s, k: saved.append(k), nan_hint="Do X.")
    with pytest.raises(TrainingError, match=r"non-finite training signal at step 4 of t .*Last good checkpoint: 2 .*Do X\."):
        run_loop(lp, 0, nan_at_4)
    assert saved == [2]  # nothing saved for the bad step


def test_fault_hook_names_loop_and_step(monkeypatch):
    kills = []
    monkeypatch.setattr(loop_mod.os, "kill", lambda pid, sig: kills.append(sig))
    monkeypatch.setenv(loop_mod.FAULT_ENV, "mstep-1:3")
    run_loop(Loop("mstep-0", 0, 5, "/tmp", progress=False), 0, _count)
    assert kills == []
    run_loop(Loop("mstep-1", 0, 5, "/tmp", progress=False), 0, _count)
    assert kills == [signal.SIGKILL]


def test_update_core_accumulation_equals_one_shot_gradient():
    """A least-squares objective: the step over 4 micro-batches equals the one-shot step, and both equal the
    hand-written gradient of the whole-batch mean loss."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8,)).astype(np.float32)
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}

    def loss(p, rows, n):
        err = rows["x"] @ p["w"] + p["b"] - rows["y"]
        return (err**2).sum() / n, {"sq": (err**2).sum()}

    obj = Objective(loss=loss, prepare=lambda b: (b, b["y"].shape[0], {}), finish=lambda aux, n, prep: {"mse": aux["sq"] / n})
    tx = optax.sgd(0.1)
    st = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    one, m1 = update_step(st, batch, objective=obj, tx=tx, micro_batches=1)
    four, m4 = update_step(st, batch, objective=obj, tx=tx, micro_batches=4)
    gw, gb = (2 / 8) * x.T @ (-y), (2 / 8) * (-y).sum()  # d/dw, d/db of mean((xw + b - y)^2) at w = 0, b = 0
    np.testing.assert_allclose(one.params["w"], -0.1 * gw, rtol=1e-5)
    np.testing.assert_allclose(one.params["b"], -0.1 * gb, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), one.params, four.params)
    assert float(m1["loss"]) == pytest.approx(float((y**2).mean()), rel=1e-5) == float(m4["loss"])
    assert float(m4["mse"]) == pytest.approx(float(m1["mse"]), rel=1e-5) and int(one.step) == 1
    assert float(m1["grad_norm"]) == pytest.approx(float(np.sqrt((gw**2).sum() + gb**2)), rel=1e-5)


def test_tokens_per_s_counts_every_step_between_fetches(tmp_path, monkeypatch):
    """With log_every > 1 the loop fetches metrics every few steps; the unfetched steps' tokens count too."""
    from ra3_jax.train import loop as loop_mod

    clock = {"t": 0.0}
    monkeypatch.setattr(loop_mod.time, "perf_counter", lambda: clock["t"])

    def step(s, k):  # each step takes 2 s of the fake clock and processes 100 tokens
        clock["t"] += 2.0
        return s + 1, {"loss": 1.0, "tokens": 100.0}

    _, last = run_loop(Loop("t", 0, 10, str(tmp_path), log_every=5, progress=False), 0, step)
    assert last["tokens_per_s"] == pytest.approx(50.0)
