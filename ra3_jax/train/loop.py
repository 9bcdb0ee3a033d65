"""Host loop for next-token training: data, jitted step, eval, progress, metrics, async Orbax, resume.

Resume is exact: the train state, the Grain iterator state and the step counter are checkpointed together,
so training N steps straight and training k steps, dying, and resuming to N give identical parameters and
loss curves on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time

import jax
import numpy as np

from ra3_jax import distributed, meshes, sharding
from ra3_jax.config import RunConfig, dump_config
from ra3_jax.data.corpus import build_corpus
from ra3_jax.data.pipeline import make_dataset, pad_batch
from ra3_jax.model.convert import resolve_model_path
from ra3_jax.model.params import param_shardings
from ra3_jax.model.store import load_model, save_model_config
from ra3_jax.tokenizer import TokenizerError, load_from_dir, load_tokenizer
from ra3_jax.train.checkpoint import RunCheckpointer
from ra3_jax.train.state import abstract_state, create_state, learning_rate_schedule, make_optimizer, state_shardings
from ra3_jax.train.step import jit_eval_step, jit_train_step

log = logging.getLogger(__name__)
FAULT_ENV = "RA3_FAULT_KILL_AFTER_STEP"  # test hook: SIGKILL this process right after the given step


class TrainingError(RuntimeError):
    pass


is_main_process = distributed.is_main_process


def make_run_mesh(cfg: RunConfig):
    return meshes.make_run_mesh(cfg.mesh)


def process_split_kwargs(cfg: RunConfig, mesh) -> dict:
    """Batch size and sharding arguments of this process's part of the global batch stream (``data.batch_size``
    rows per step over all processes), for ``make_dataset`` / ``packed_batches`` pipelines.

    ``data.process_split``: ``records`` gives each distinct row block of the mesh its own shard of the records;
    ``rows`` has every process read the global stream and keep its rows."""
    B = cfg.data.batch_size
    lo, hi, shard, count = distributed.data_shard(mesh, B)
    if count == 1:
        return dict(batch_size=B)
    if cfg.data.process_split == "rows":
        return dict(batch_size=B, rows=(lo, hi))
    return dict(batch_size=hi - lo, shard_index=shard, shard_count=count)


def process_dataset(source, tokenizer, cfg: RunConfig, mesh, **kw):
    """This process's part of the global token batch stream (see ``process_split_kwargs``)."""
    return make_dataset(source, tokenizer, seq_len=cfg.data.seq_len, **process_split_kwargs(cfg, mesh), **kw)


def data_state_to_save(data_iter, cfg: RunConfig) -> dict:
    """The iterator state for a checkpoint: one state, or (records split, several processes) one per process."""
    state = data_iter.get_state()
    if jax.process_count() == 1 or cfg.data.process_split == "rows":
        return state
    from ra3_jax.train.checkpoint import _jsonable

    return {"per_process": distributed.allgather_json(_jsonable(state)), "process_split": "records"}


def restore_data_state(data_iter, saved: dict, cfg: RunConfig, step: int) -> None:
    n = jax.process_count()
    if "per_process" in saved:
        states = saved["per_process"]
        if len(states) != n:
            raise TrainingError(
                f"the checkpoint of step {step} was written by {len(states)} processes with data.process_split=records, "
                f"whose data positions are per process; resume it with {len(states)} processes (any mesh), or restart "
                "the data stream with data.process_split=rows"
            )
        data_iter.set_state(states[jax.process_index()])
        return
    if n > 1 and cfg.data.process_split == "records":
        raise TrainingError(
            f"the checkpoint of step {step} holds one data position (written by 1 process or with data.process_split=rows); "
            f"resume it with data.process_split=rows to continue the same global batch stream on {n} processes"
        )
    data_iter.set_state(saved)


def resolve_tokenizer(cfg: RunConfig):
    kind, path = cfg.tokenizer.kind, cfg.tokenizer.path
    if kind == "auto":
        if cfg.model.init == "gguf":
            return load_tokenizer("gguf", cfg.model.path)
        if cfg.model.init in ("hf", "orbax"):
            return load_from_dir(resolve_model_path(cfg.model.path))
        raise TokenizerError("model.init=random needs an explicit tokenizer.kind and tokenizer.path")
    if not path:
        raise TokenizerError(f"tokenizer.kind={kind} needs tokenizer.path")
    return load_tokenizer(kind, path)


def check_vocab(tokenizer, model_cfg) -> None:
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise TrainingError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary only {model_cfg.vocab_size}: "
            "pair the model with its own tokenizer (tokenizer.kind/path) or raise model.vocab_size"
        )


def global_batch(local: dict, mesh, global_rows: int | None = None) -> dict:
    """Per-process host batch (this process's rows, ``distributed.process_rows``) -> global jax.Arrays sharded
    over (data, fsdp). ``global_rows`` defaults to local rows x the number of distinct row blocks."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        shape = None if global_rows is None else (global_rows,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v, shape)
    return out


def write_run_metadata(out_dir: str, cfg: RunConfig, model_cfg, tokenizer) -> None:
    """config.yaml, model_config.json and the tokenizer next to the checkpoints (a run dir loads as a model dir)."""
    if is_main_process():
        dump_config(cfg, os.path.join(out_dir, "config.yaml"))
        save_model_config(out_dir, model_cfg)
        tokenizer.save(out_dir)


def raise_if_nonfinite(m: dict, step: int, last_good: int | None, out_dir: str, where: str = "") -> None:
    """NaN guard: a clear error naming the last good checkpoint (nothing is saved for this step)."""
    if math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]):
        return
    raise TrainingError(
        f"non-finite training signal at step {step}{where} (loss {m['loss']}, grad norm {m['grad_norm']}); nothing was saved for "
        f"this step. Last good checkpoint: {last_good if last_good is not None else 'none'} in {out_dir}. "
        "Lower optim.lr, raise optim.warmup_steps, or use model.compute_dtype=float32."
    )


def evaluate(params, eval_fn, source, tokenizer, cfg: RunConfig, mesh, token_bytes: np.ndarray) -> dict:
    """Held-out loss (nats/token) and bits per byte over the first ``train.eval_batches`` batches (0 = all)."""
    # Every process reads the same global validation batches and feeds its rows: the same number of steps on
    # every process, and the same numbers as a one-process evaluation.
    B = cfg.data.batch_size
    lo, hi = distributed.process_rows(mesh, B)
    ds = make_dataset(source, tokenizer, seq_len=cfg.data.seq_len, batch_size=B, shuffle=False, num_epochs=1)
    nll, ntok, nbytes = 0.0, 0.0, 0.0
    for i, b in enumerate(ds):
        if cfg.train.eval_batches and i >= cfg.train.eval_batches:
            break
        b = pad_batch(b, B)
        m = jax.device_get(eval_fn(params, global_batch({k: v[lo:hi] for k, v in b.items()}, mesh, B)))
        nll += float(m["nll_sum"])
        ntok += float(m["tokens"])
        nbytes += float((token_bytes[b["targets"]] * b["loss_mask"]).sum())
    if ntok == 0:
        raise TrainingError("the validation split produced no tokens; raise data.validation_fraction")
    return {"eval/loss": nll / ntok, "eval/bits_per_byte": nll / math.log(2) / max(nbytes, 1.0), "eval/tokens": ntok}


class MetricsWriter:
    """TensorBoard event files + a JSONL log (the loss curve); optional W&B. Only process 0 writes."""

    def __init__(self, out_dir: str, resume_step: int, wandb_project: str | None = None):
        self.enabled = is_main_process()
        self.jsonl = os.path.join(out_dir, "metrics.jsonl")
        self._tb = self._wandb = None
        if not self.enabled:
            return
        # Drop entries past the step we resume from: the resumed run rewrites them.
        if os.path.exists(self.jsonl):
            with open(self.jsonl, encoding="utf-8") as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= resume_step]
            with open(self.jsonl, "w", encoding="utf-8") as f:
                f.writelines(keep)
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
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def close(self):
        if self._tb is not None:
            self._tb.close()


def train(cfg: RunConfig, *, mode: str = "pretrain") -> dict:
    """Run next-token training per ``cfg``; returns the final metrics. Resumes from ``train.out_dir``."""
    if mode == "pretrain" and cfg.model.init != "random":
        raise TrainingError(f"pretrain starts from random weights; model.init={cfg.model.init}: use midtrain-ntp")
    if mode == "midtrain-ntp" and cfg.model.init == "random":
        raise TrainingError("midtrain-ntp continues a trained model: set model.init (gguf | hf | orbax) and model.path")
    out_dir = os.path.abspath(os.path.expanduser(cfg.train.out_dir))
    os.makedirs(out_dir, exist_ok=True)
    mesh = make_run_mesh(cfg)
    dp = sharding.data_parallel_size(mesh)
    if cfg.data.batch_size % dp:
        raise TrainingError(f"data.batch_size={cfg.data.batch_size} must be divisible by the data-parallel size {dp}")
    if (cfg.data.batch_size // cfg.optim.grad_accum) % dp:
        raise TrainingError(f"micro-batch {cfg.data.batch_size // cfg.optim.grad_accum} not divisible by data-parallel size {dp}")

    tokenizer = resolve_tokenizer(cfg)
    sources = build_corpus(cfg.data)
    model_cfg, params = load_model(cfg.model, mesh, key=jax.random.key(cfg.train.seed))
    check_vocab(tokenizer, model_cfg)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        log.warning("data.seq_len=%d exceeds the model's max_seq_len=%d", cfg.data.seq_len, model_cfg.max_seq_len)

    tx = make_optimizer(cfg.optim, cfg.train.steps)
    lr_at = learning_rate_schedule(cfg.optim, cfg.train.steps)
    st_shard = state_shardings(model_cfg, tx, mesh)
    step_fn = jit_train_step(model_cfg, tx, cfg.optim.grad_accum, mesh, st_shard)
    eval_fn = jit_eval_step(model_cfg, mesh, param_shardings(model_cfg, mesh))

    if cfg.data.num_epochs and cfg.data.process_split == "records" and distributed.data_shard(mesh, cfg.data.batch_size)[3] > 1:
        # Record shards hold different numbers of batches: processes would run out at different steps and wait
        # on each other forever.
        raise TrainingError(
            "data.num_epochs > 0 with data.process_split=records in a multi-process run: the per-process "
            "shards end at different steps. Use data.process_split=rows, or num_epochs=0 (repeat) with train.steps"
        )
    ckpt = RunCheckpointer(
        os.path.join(out_dir, "checkpoints"), keep=cfg.train.keep_checkpoints, async_save=cfg.train.async_checkpoints
    )
    ds = process_dataset(
        sources["train"], tokenizer, cfg, mesh, seed=cfg.data.shuffle_seed, num_epochs=cfg.data.num_epochs or None
    )
    data_iter = iter(ds)
    start = ckpt.latest_step()
    if start is not None:
        state, data_state, meta = ckpt.restore(start, abstract_state(model_cfg, tx, mesh))
        restore_data_state(data_iter, data_state, cfg, start)
        del params
        log.info("resumed from step %d in %s", start, out_dir)
    else:
        start = 0
        state = create_state(params, tx, model_cfg, mesh)
        del params
    write_run_metadata(out_dir, cfg, model_cfg, tokenizer)

    writer = MetricsWriter(out_dir, start, cfg.train.wandb_project)
    token_bytes = tokenizer.token_bytes()
    kill_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    progress = None
    if cfg.train.progress and is_main_process():
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.train.steps, initial=start, desc=mode, unit="step", dynamic_ncols=True)
    last: dict = {}
    at_start: dict = {}
    if start == 0 and cfg.train.eval_at_start and cfg.train.eval_every and sources["validation"] is not None:
        ev = evaluate(state.params, eval_fn, sources["validation"], tokenizer, cfg, mesh, token_bytes)
        writer.write(0, ev)
        at_start = {f"{k}@start": v for k, v in ev.items() if k != "eval/tokens"}
    t0, tok0 = time.perf_counter(), 0.0
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            try:
                host = next(data_iter)
            except StopIteration:
                log.warning("data exhausted after %d epochs at step %d", cfg.data.num_epochs, step - 1)
                break
            state, m = step_fn(state, global_batch(host, mesh, cfg.data.batch_size))
            must_check = step % cfg.train.log_every == 0 or step % cfg.train.ckpt_every == 0 or step == cfg.train.steps
            if must_check:
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                raise_if_nonfinite(m, step, ckpt.latest_step(), out_dir)
                dt = time.perf_counter() - t0
                tok0 += m["tokens"]
                m.update(lr=float(lr_at(step - 1)), tokens_per_s=tok0 / max(dt, 1e-9))
                writer.write(step, m)
                last = m
                if progress is not None:
                    progress.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
            if (
                cfg.train.eval_every
                and (step % cfg.train.eval_every == 0 or step == cfg.train.steps)
                and sources["validation"] is not None
            ):
                ev = evaluate(state.params, eval_fn, sources["validation"], tokenizer, cfg, mesh, token_bytes)
                writer.write(step, ev)
                last.update(ev)
            if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
                ckpt.save(
                    step,
                    state,
                    data_state_to_save(data_iter, cfg),
                    {"step": step, "mode": mode, "processes": jax.process_count()},
                )
            if progress is not None:
                progress.update(1)
            if kill_after and step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        if progress is not None:
            progress.close()
        ckpt.close()
        writer.close()
    last.update(at_start)
    last["step"] = int(jax.device_get(state.step))
    return last


def evaluate_only(cfg: RunConfig) -> dict:
    """Held-out loss / bits-per-byte of the configured model on the corpus' validation split."""
    mesh = make_run_mesh(cfg)
    tokenizer = resolve_tokenizer(cfg)
    sources = build_corpus(cfg.data)
    if sources["validation"] is None:
        raise TrainingError("the corpus has no validation split; raise data.validation_fraction")
    model_cfg, params = load_model(cfg.model, mesh, key=jax.random.key(cfg.train.seed))
    check_vocab(tokenizer, model_cfg)
    eval_fn = jit_eval_step(model_cfg, mesh, param_shardings(model_cfg, mesh))
    return evaluate(params, eval_fn, sources["validation"], tokenizer, cfg, mesh, tokenizer.token_bytes())
