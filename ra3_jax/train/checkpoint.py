"""Orbax checkpoints of a run: train state + data-iterator state + metadata, async, keep-N, atomic.

Layout: ``<out_dir>/checkpoints/<step>/{state,data,meta}``. Orbax writes each step into a temporary
directory and renames it when complete, so a process killed mid-save leaves no half-written step behind:
``latest_step()`` only sees finished ones.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

from ra3_jax.errors import RA3Error


class CheckpointIOError(RA3Error, RuntimeError):
    pass


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _detuple(x):
    # grain states hold tuples; JSON gives lists back -> restore tuples for list-valued leaves of ints.
    if isinstance(x, dict):
        return {k: _detuple(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_detuple(v) for v in x)
    return x


class RunCheckpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(_jsonable(data_state)),
                meta=ocp.args.JsonSave(_jsonable(meta)),
            ),
        )

    def restore(self, step: int, abstract_state):
        try:
            out = self._mngr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:
            raise CheckpointIOError(f"cannot restore checkpoint step {step} from {self.directory}: {e}") from e
        return out["state"], _detuple(out["data"]), out["meta"]

    def restore_data(self, step: int) -> dict:
        """Only the JSON ``data`` item of a step (no arrays are read)."""
        out = self._mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
        return _detuple(out["data"])

    def restore_params(self, step: int, abstract_params):
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": abstract_params},
                    restore_args=ocp.checkpoint_utils.construct_restore_args({"params": abstract_params}),
                    partial_restore=True,
                )
            ),
        )
        return out["state"]["params"]

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
