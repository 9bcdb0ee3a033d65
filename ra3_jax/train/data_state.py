"""How the processes of a run share the global batch stream, and the data position saved in checkpoints."""

from __future__ import annotations

import jax

from ra3_jax import distributed
from ra3_jax.config import RunConfig
from ra3_jax.data.pipeline import make_dataset
from ra3_jax.errors import TrainingError


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


def check_finite_epochs(cfg: RunConfig, mesh) -> None:
    if cfg.data.num_epochs and cfg.data.process_split == "records" and distributed.data_shard(mesh, cfg.data.batch_size)[3] > 1:
        # Record shards hold different numbers of batches: processes would run out at different steps and wait
        # on each other forever.
        raise TrainingError(
            "data.num_epochs > 0 with data.process_split=records in a multi-process run: the per-process "
            "shards end at different steps. Use data.process_split=rows, or num_epochs=0 (repeat) with train.steps"
        )


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


def grain_state(x):
    """A Grain iterator state read back from a checkpoint's JSON: Grain's states hold tuples, JSON gives lists."""
    if isinstance(x, dict):
        return {k: grain_state(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(grain_state(v) for v in x)
    return x


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
        data_iter.set_state(grain_state(states[jax.process_index()]))
        return
    if n > 1 and cfg.data.process_split == "records":
        raise TrainingError(
            f"the checkpoint of step {step} holds one data position (written by 1 process or with "
            f"data.process_split=rows); resume it with data.process_split=rows to continue the same global batch "
            f"stream on {n} processes"
        )
    data_iter.set_state(grain_state(saved))
