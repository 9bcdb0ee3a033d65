"""Next-token training (``ra3 pretrain`` / ``ra3 midtrain-ntp``) and held-out loss, on the one host loop.

Resume is exact: the train state, the Grain iterator state and the step counter are checkpointed together,
so training N steps straight and training k steps, dying, and resuming to N give identical parameters and
loss curves on CPU. ``ntp_steps`` is also the RA3 M-step (same loop, same step, another data stream).
"""

from __future__ import annotations

import logging
import math

import jax

from ra3_jax import distributed
from ra3_jax.config import RunConfig
from ra3_jax.data.corpus import build_corpus
from ra3_jax.data.pipeline import make_dataset, pad_batch
from ra3_jax.errors import TrainingError
from ra3_jax.model.params import param_shardings
from ra3_jax.train.context import RunContext, build_run_context, check_rows, global_batch, load_model_and_tokenizer
from ra3_jax.train.data_state import check_finite_epochs, data_state_to_save, process_dataset, restore_data_state
from ra3_jax.train.loop import Loop, StopLoop, run_loop
from ra3_jax.train.state import abstract_state, create_state, learning_rate_schedule, make_optimizer, state_shardings
from ra3_jax.train.step import jit_eval_step, jit_train_step

log = logging.getLogger(__name__)


def evaluate(params, eval_fn, source, tokenizer, cfg: RunConfig, mesh, token_bytes) -> dict:
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


def check_batch(cfg: RunConfig, mesh) -> None:
    check_rows(cfg.data.batch_size, mesh, "data.batch_size")
    check_rows(cfg.data.batch_size // cfg.optim.grad_accum, mesh, "the micro-batch data.batch_size / optim.grad_accum")


def ntp_steps(
    ctx: RunContext,
    state,
    data_iter,
    step_fn,
    *,
    name: str,
    start: int,
    end: int,
    writer,
    lr_at,
    meta: dict,
    evaluate_fn=None,
    extra=None,
):
    """Next-token steps ``start + 1 .. end`` on ``data_iter`` through the host loop; checkpoints hold the state
    and the data position. Returns (state, last metrics)."""
    cfg = ctx.cfg

    def step(state, s):
        try:
            host = next(data_iter)
        except StopIteration:
            raise StopLoop(f"data exhausted after {cfg.data.num_epochs} epochs") from None
        return step_fn(state, global_batch(host, ctx.mesh, cfg.data.batch_size))

    def save(state, s):
        ctx.ckpt.save(s, state, data_state_to_save(data_iter, cfg), {"step": s, **meta})

    loop = Loop.for_run(
        name,
        start,
        end,
        ctx.out_dir,
        writer,
        cfg.train,
        evaluate=evaluate_fn,
        save=save,
        lr_at=lr_at,
        postfix=lambda m: {"loss": f"{m['loss']:.4f}", "tok_s": f"{m['tokens_per_s']:.0f}"},
        extra=extra or {},
    )
    return run_loop(loop, state, step)


def train(cfg: RunConfig, *, mode: str = "pretrain") -> dict:
    """Run next-token training per ``cfg``; returns the final metrics. Resumes from ``train.out_dir``."""
    if mode == "pretrain" and cfg.model.init != "random":
        raise TrainingError(f"pretrain starts from random weights; model.init={cfg.model.init}: use midtrain-ntp")
    if mode == "midtrain-ntp" and cfg.model.init == "random":
        raise TrainingError(
            "midtrain-ntp continues a trained model: pass its config (e.g. --config configs/smollm2_135m_cpu.yaml) "
            "or set model.init (gguf | hf | orbax) and model.path"
        )
    ctx = build_run_context(cfg)
    check_batch(cfg, ctx.mesh)
    check_finite_epochs(cfg, ctx.mesh)
    sources = build_corpus(cfg.data, cfg.chains)
    if cfg.data.seq_len > ctx.model_cfg.max_seq_len:
        log.warning("data.seq_len=%d exceeds the model's max_seq_len=%d", cfg.data.seq_len, ctx.model_cfg.max_seq_len)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    step_fn = jit_train_step(ctx.model_cfg, tx, cfg.optim.grad_accum, ctx.mesh, state_shardings(ctx.model_cfg, tx, ctx.mesh))
    eval_fn = jit_eval_step(ctx.model_cfg, ctx.mesh, param_shardings(ctx.model_cfg, ctx.mesh))
    ds = process_dataset(
        sources["train"], ctx.tokenizer, cfg, ctx.mesh, seed=cfg.data.shuffle_seed, num_epochs=cfg.data.num_epochs or None
    )
    data_iter = iter(ds)
    state, start = restore_or_create(ctx, tx, data_iter)
    writer = ctx.start_run(start)
    token_bytes = ctx.tokenizer.token_bytes()
    evaluate_fn = None
    if sources["validation"] is not None:
        evaluate_fn = lambda st, s: evaluate(st.params, eval_fn, sources["validation"], ctx.tokenizer, cfg, ctx.mesh, token_bytes)
    at_start: dict = {}
    if start == 0 and cfg.train.eval_at_start and cfg.train.eval_every and evaluate_fn is not None:
        ev = evaluate_fn(state, 0)
        writer.write(0, ev)
        at_start = {f"{k}@start": v for k, v in ev.items() if k != "eval/tokens"}
    lr_at = learning_rate_schedule(cfg.optim, cfg.train.steps)
    try:
        state, last = ntp_steps(
            ctx,
            state,
            data_iter,
            step_fn,
            name=mode,
            start=start,
            end=cfg.train.stop_step or cfg.train.steps,
            writer=writer,
            lr_at=lambda s: lr_at(s - 1),
            meta={"mode": mode, "processes": jax.process_count()},
            evaluate_fn=evaluate_fn,
        )
    finally:
        ctx.ckpt.close()
        writer.close()
    return {**last, **at_start, "step": int(jax.device_get(state.step))}


def restore_or_create(ctx: RunContext, tx, data_iter=None):
    """(train state, start step): the run's checkpoint (the latest, or ``train.resume_step``; checked, and the steps
    after it moved aside) with its data position, or a fresh state when the run has none."""
    start = ctx.ckpt.pick_step(ctx.cfg.train.resume_step)
    params = ctx.take_params()
    if start is None:
        return create_state(params, tx, ctx.model_cfg, ctx.mesh), 0
    del params
    state, data_state, _ = ctx.ckpt.restore(start, abstract_state(ctx.model_cfg, tx, ctx.mesh))
    if data_iter is not None:
        restore_data_state(data_iter, data_state, ctx.cfg, start)
    log.info("resumed from step %d in %s", start, ctx.out_dir)
    return state, start


def evaluate_only(cfg: RunConfig) -> dict:
    """Held-out loss / bits-per-byte of the configured model on the corpus' validation split."""
    from ra3_jax.train.context import make_run_mesh

    mesh = make_run_mesh(cfg)
    sources = build_corpus(cfg.data, cfg.chains)
    if sources["validation"] is None:
        raise TrainingError("the corpus has no validation split; raise data.validation_fraction")
    tokenizer, model_cfg, params = load_model_and_tokenizer(cfg, mesh, key=jax.random.key(cfg.train.seed))
    eval_fn = jit_eval_step(model_cfg, mesh, param_shardings(model_cfg, mesh))
    return evaluate(params, eval_fn, sources["validation"], tokenizer, cfg, mesh, tokenizer.token_bytes())
