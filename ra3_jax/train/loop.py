"""The one host loop: N steps of a step function with progress, metrics, NaN guard, eval and checkpoint cadence,
and the fault hook. NTP training, the RA3 E-step batches and M-step, RLPT's cold-start SFT and the GRPO loop
(RLVR, RLPT) all run through :func:`run_loop`; each supplies only its step function, its evaluation and its save.

Resume is exact when the caller restores the state its ``save`` wrote and starts the loop at that step: the loop
itself is stateless across steps except for the progress bar and the throughput counters.

Fault hook (tests): ``RA3_FAULT_KILL_AFTER_STEP=<loop name>:<step>`` SIGKILLs the process right after that step
of the loop with that name (e.g. ``pretrain:9``, ``rlvr:4``, ``estep-1:1``, ``mstep-1:7``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable

import jax

from ra3_jax import distributed
from ra3_jax.errors import TrainingError

log = logging.getLogger(__name__)
FAULT_ENV = "RA3_FAULT_KILL_AFTER_STEP"
is_main_process = distributed.is_main_process


class StopLoop(Exception):
    """Raised by a step function to end its loop early (e.g. a finite data stream ran out)."""


def fault_point(name: str, step: int) -> None:
    """SIGKILL this process if ``RA3_FAULT_KILL_AFTER_STEP`` names this loop and step (a test hook)."""
    if os.environ.get(FAULT_ENV, "") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


NAN_HINT = "Lower optim.lr, raise optim.warmup_steps, or use model.compute_dtype=float32."


def raise_if_nonfinite(
    m: dict, step: int, last_good: int | None, out_dir: str, where: str = "", keys=("loss", "grad_norm"), hint: str = NAN_HINT
):
    """NaN guard: a clear error naming the last good checkpoint (nothing is saved for this step)."""
    bad = {k: m[k] for k in keys if k in m and not math.isfinite(m[k])}
    if not bad:
        return
    shown = ", ".join(f"{k} {m[k]}" for k in keys if k in m)
    raise TrainingError(
        f"non-finite training signal at step {step}{where} ({shown}); nothing was saved for this step. "
        f"Last good checkpoint: {last_good if last_good is not None else 'none'} in {out_dir}. {hint}"
    )


def progress_bar(enabled: bool, total: int, desc: str, initial: int = 0, unit: str = "step"):
    """A tqdm bar on process 0 when ``enabled``, else None."""
    if not (enabled and is_main_process()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)


class MetricsWriter:
    """TensorBoard event files + a JSONL log (the loss curve); optional W&B. Only process 0 writes."""

    def __init__(self, out_dir: str, resume_step: int, wandb_project: str | None = None, *, name: str = "metrics.jsonl"):
        self.enabled = is_main_process()
        self.jsonl = os.path.join(out_dir, name)
        self._tb = self._wandb = None
        if not self.enabled:
            return
        truncate_jsonl(self.jsonl, lambda row: row["step"] <= resume_step)  # the resumed run rewrites the rest
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=resume_step + 1 if resume_step else None)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise TrainingError("train.wandb_project is set but wandb is not installed (pip install wandb)") from None
            self._wandb = wandb.init(project=wandb_project, dir=out_dir, resume="allow")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        append_jsonl(self.jsonl, row)
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def truncate_jsonl(path: str, keep: Callable[[dict], bool]) -> None:
    """Keep only the rows of a JSONL log that ``keep`` accepts (process 0 writes)."""
    if is_main_process() and os.path.exists(path):
        rows = [r for r in read_jsonl(path) if keep(r)]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def append_jsonl(path: str, row: dict) -> None:
    if is_main_process():
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


@dataclasses.dataclass
class Loop:
    """What one host loop runs: steps ``start + 1 .. end`` named ``name``; cadences in steps (0 = never)."""

    name: str
    start: int
    end: int
    out_dir: str
    writer: MetricsWriter | None = None
    log_every: int = 1
    eval_every: int = 0
    ckpt_every: int = 0
    progress: bool = True
    unit: str = "step"
    evaluate: Callable | None = None  # (state, step) -> metrics
    save: Callable | None = None  # (state, step) -> None
    lr_at: Callable | None = None  # step -> learning rate (logged as "lr")
    finite_keys: tuple = ("loss", "grad_norm")
    nan_hint: str = NAN_HINT  # what to change when a metric is NaN/inf
    postfix: Callable | None = None  # host metrics -> progress-bar fields
    extra: dict = dataclasses.field(default_factory=dict)  # constant fields of every metrics row

    @classmethod
    def for_run(cls, name: str, start: int, end: int, out_dir: str, writer, train, **kw) -> Loop:
        """A loop with the run's cadences and progress setting (the ``train`` config section)."""
        cadence = dict(log_every=train.log_every, eval_every=train.eval_every, ckpt_every=train.ckpt_every)
        return cls(name, start, end, out_dir, writer, progress=train.progress, **cadence, **kw)


def _due(every: int, step: int, end: int) -> bool:
    return bool(every) and (step % every == 0 or step == end)


def run_loop(loop: Loop, state, step_fn: Callable, *, last_good: int | None = None):
    """Run ``state, metrics = step_fn(state, step)`` for each step of ``loop``; returns (state, last host metrics).

    Metrics are fetched to the host only on log and checkpoint steps (the device runs ahead otherwise), checked
    for NaN/inf, written with ``lr`` and ``tokens_per_s`` (when the step reports ``tokens``), then evaluation and
    checkpoint run on their cadence and the fault hook last."""
    bar = progress_bar(loop.progress, loop.end, loop.name, loop.start, loop.unit)
    last: dict = {}
    t0, tokens, fetched = time.perf_counter(), 0.0, loop.start
    last_good = loop.start if last_good is None and loop.start else last_good
    try:
        for step in range(loop.start + 1, loop.end + 1):
            try:
                state, m = step_fn(state, step)
            except StopLoop as stop:
                log.warning("%s stopped after step %d: %s", loop.name, step - 1, stop)
                break
            if _due(loop.log_every, step, loop.end) or _due(loop.ckpt_every, step, loop.end):
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                raise_if_nonfinite(m, step, last_good, loop.out_dir, f" of {loop.name}", loop.finite_keys, loop.nan_hint)
                tokens += m.get("tokens", 0.0) * (step - fetched)  # the steps since the last fetch ran too
                fetched = step
                if "tokens" in m:
                    m["tokens_per_s"] = tokens / max(time.perf_counter() - t0, 1e-9)
                if loop.lr_at is not None:
                    m["lr"] = float(loop.lr_at(step))
                if loop.writer is not None:
                    loop.writer.write(step, {**m, **loop.extra})
                last = m
                if bar is not None and loop.postfix is not None:
                    bar.set_postfix(loop.postfix(m))
            if loop.evaluate is not None and _due(loop.eval_every, step, loop.end):
                ev = loop.evaluate(state, step)
                if loop.writer is not None and ev:
                    loop.writer.write(step, ev)
                last = {**last, **ev}
            if loop.save is not None and _due(loop.ckpt_every, step, loop.end):
                loop.save(state, step)
                last_good = step
            if bar is not None:
                bar.update(1)
            fault_point(loop.name, step)
    finally:
        if bar is not None:
            bar.close()
    return state, last
