"""Orbax checkpoints of a run: train state + data-iterator state + metadata, async, keep-N, atomic, checked.

Layout: ``<out_dir>/checkpoints/<step>/{state,data,meta}``. Orbax writes each step into a temporary
directory and renames it when complete, so a process killed mid-save leaves no half-written step behind:
``latest_step()`` only sees finished ones.

A finished step can still be damaged later (a disk filled up, a copy cut short, a file overwritten). Before a
step is restored it is checked (``damage``), and a damaged step is one ``CheckpointIOError`` line naming the
step, the damaged file, the intact steps that remain and the override that resumes from one
(``train.resume_step=<step>``) instead of Orbax's tracebacks and TensorStore dumps. ``pick_step`` picks the step
a run resumes from (the latest, or the one ``train.resume_step`` names) and moves the steps after it aside to
``<dir>.discarded/`` so the run can write them again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys

import orbax.checkpoint as ocp

from ra3_jax.errors import RA3Error

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "meta")
_NOISY_LOGGERS = ("absl", "orbax", "tensorstore", "asyncio")
# An OCDBT location in ``tensorstore.ocdbt.dump`` output: <kind>:<base path>:<file>:<offset>:<length>.
_LOCATION = re.compile(r"^(btreenode|versionnode|value):([^:]*):([^:]+):(\d+):(\d+)$")


class CheckpointIOError(RA3Error, RuntimeError):
    pass


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _aborted_read_noise(u) -> bool:
    """An unraisable error left by an aborted Orbax read: asyncio's "Event loop is closed" (TensorStore callbacks
    reaching the loop Orbax already closed), or a pending Orbax read coroutine closed by the garbage collector
    (Orbax's ``except`` turns the GeneratorExit into an Exception about the array index it was reading)."""
    e = u.exc_value
    if isinstance(e, RuntimeError) and "Event loop is closed" in str(e):
        return True
    code = getattr(u.object, "cr_code", None)
    from_orbax = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
    return from_orbax and isinstance(getattr(e, "__cause__", None), GeneratorExit)


def _loop_closed_filter(previous):
    """An unraisable hook that drops the noise of an aborted Orbax read (``_aborted_read_noise``) and hands
    everything else to ``previous``."""

    def hook(u):
        if _aborted_read_noise(u):
            return
        previous(u)

    hook.ra3_loop_closed_filter = True
    return hook


@contextlib.contextmanager
def quiet_orbax():
    """Orbax / TensorStore / absl / asyncio logging off around a checkpoint read (unless the root logger is set
    below WARNING, i.e. the user asked for the detail); the log levels are restored afterwards. The checks of
    this module report what those logs would have said, in one line. After a failed read, its late noise (asyncio's
    "Event loop is closed", its read coroutines closed by the garbage collector) stays filtered (every other
    unraisable error still reaches the previous hook)."""
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
    previous = sys.unraisablehook
    if not getattr(previous, "ra3_loop_closed_filter", False):
        sys.unraisablehook = _loop_closed_filter(previous)
    try:
        yield
    except BaseException:
        raise  # the filter stays: callbacks of the aborted read may still arrive
    else:
        sys.unraisablehook = previous
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _short(e: BaseException, limit: int = 300) -> str:
    """The first line of an Orbax / TensorStore error, without its TensorStore spec dump."""
    text = str(e).split(". See full TensorStore details", 1)[0].strip().splitlines()
    text = text[0] if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ts_reason(e: BaseException) -> str:
    """A TensorStore error without its status code and the absolute paths it repeats."""
    text = re.sub(r'^[A-Z_]+: |Error \w+ local file "[^"]*": ', "", _short(e, 1000))
    return text if len(text) <= 160 else text[:157] + "..."


def _json_problem(path: str, rel: str) -> str | None:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return f"{rel} is missing"
    except OSError as e:
        return f"{rel} cannot be read ({e.strerror})"
    if not raw.strip():
        return f"{rel} is empty"
    try:
        json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        return f"{rel} is not valid JSON ({e})"
    return None


def _locations(x):
    """Every OCDBT location string anywhere in a ``tensorstore.ocdbt.dump`` result."""
    if isinstance(x, dict):
        for v in x.values():
            yield from _locations(v)
    elif isinstance(x, list):
        for v in x:
            yield from _locations(v)
    elif isinstance(x, str) and _LOCATION.match(x):
        yield x


def _ocdbt_problem(item_dir: str, rel: str) -> str | None:
    """Walk the OCDBT database of an item: the manifest and every index node decode, and every file they
    reference is there and long enough for the byte ranges they reference (array bytes are not read)."""
    import tensorstore as ts

    base = ts.KvStore.open(f"file://{item_dir}/").result()
    if not os.path.exists(os.path.join(item_dir, "manifest.ocdbt")):
        return f"{rel}/manifest.ocdbt is missing"
    try:
        todo = list(_locations(ts.ocdbt.dump(base).result()))
    except Exception as e:
        return f"{rel}/manifest.ocdbt is not a readable OCDBT manifest ({_ts_reason(e)})"
    seen, needed = set(), {}  # needed: file -> the end of the furthest byte range the index references in it
    while todo:
        loc = todo.pop()
        if loc in seen:
            continue
        seen.add(loc)
        kind, base_path, path, offset, length = _LOCATION.match(loc).groups()
        needed[base_path + path] = max(needed.get(base_path + path, 0), int(offset) + int(length))
        if kind != "value":
            if problem := _file_problem(item_dir, rel, base_path + path, needed[base_path + path]):
                return problem
            try:
                todo.extend(_locations(ts.ocdbt.dump(base, loc).result()))
            except Exception as e:
                return f"{rel}/{base_path}{path} holds an unreadable OCDBT index node ({_ts_reason(e)})"
    for path, end in sorted(needed.items()):
        if problem := _file_problem(item_dir, rel, path, end):
            return problem
    return None


def _file_problem(item_dir: str, rel: str, path: str, end: int) -> str | None:
    try:
        size = os.path.getsize(os.path.join(item_dir, path))
    except OSError:
        return f"{rel}/{path} is missing"
    if size < end:
        return f"{rel}/{path} is truncated ({size} bytes; the checkpoint's index reads up to byte {end})"
    return None


def _state_problem(item_dir: str, rel: str) -> str | None:
    problem = _json_problem(os.path.join(item_dir, "_METADATA"), f"{rel}/_METADATA")
    if problem:
        return problem
    sharding = os.path.join(item_dir, "_sharding")
    if os.path.exists(sharding) and (problem := _json_problem(sharding, f"{rel}/_sharding")):
        return problem
    am = os.path.join(item_dir, "array_metadatas")
    for name in sorted(os.listdir(am)) if os.path.isdir(am) else []:
        if p := _json_problem(os.path.join(am, name), f"{rel}/array_metadatas/{name}"):
            return p
    with open(os.path.join(item_dir, "_METADATA"), "rb") as f:
        use_ocdbt = json.loads(f.read()).get("use_ocdbt", True)
    if use_ocdbt:
        return _ocdbt_problem(item_dir, rel)
    for root, _, files in os.walk(item_dir):  # plain zarr: every file there is an array's chunk or metadata
        for name in files:
            if os.path.getsize(os.path.join(root, name)) == 0:
                return f"{os.path.relpath(os.path.join(root, name), os.path.dirname(item_dir))} is empty"
    return None


def step_damage(directory: str, step: int) -> str | None:
    """What is wrong with checkpoint ``step`` under ``directory`` ("<step>/<file> is ..."), None if intact.

    Intact means every file a restore reads is there and readable: ``_CHECKPOINT_METADATA`` and each item's
    JSON metadata parse; the state's OCDBT manifest and index nodes decode; every data file they reference
    exists and is at least as long as the byte ranges the index gives for it. Array bytes are not read (that
    is the restore's job, so the check costs a few small reads per step, whatever the model size)."""
    d = os.path.join(directory, str(step))
    if not os.path.isdir(d):
        return f"{step}/ is missing"
    if problem := _json_problem(os.path.join(d, "_CHECKPOINT_METADATA"), f"{step}/_CHECKPOINT_METADATA"):
        return problem
    for item in ITEMS:
        if not os.path.isdir(os.path.join(d, item)):
            return f"{step}/{item}/ is missing"
    for item in ("data", "meta"):
        if problem := _json_problem(os.path.join(d, item, "metadata"), f"{step}/{item}/metadata"):
            return problem
    return _state_problem(os.path.join(d, "state"), f"{step}/state")


class RunCheckpointer:
    """``resume_override`` is the config override that picks the step a run resumes from, named in the messages
    about damaged steps; None for checkpoints it does not apply to (E-step, model loading)."""

    def __init__(
        self, directory: str, *, keep: int = 3, async_save: bool = True, resume_override: str | None = "train.resume_step"
    ):
        self.directory = os.path.abspath(directory)
        self.resume_override = resume_override
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        with quiet_orbax():
            self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def damage(self, step: int) -> str | None:
        return step_damage(self.directory, step)

    def _hint(self, step: int, intact: list[int]) -> str:
        if not intact:
            return f"no intact step remains: move {self.directory} aside to start over"
        listed = ", ".join(map(str, intact))
        if self.resume_override:
            return f"intact steps: {listed}; resume from one with {self.resume_override}={intact[-1]}"
        return (
            f"intact steps: {listed}; train.resume_step does not apply to these checkpoints: "
            f"move {os.path.join(self.directory, str(step))} aside to use step {intact[-1]}"
        )

    def _damaged(self, step: int, problem: str) -> CheckpointIOError:
        intact = [s for s in self.steps() if s != step and self.damage(s) is None]
        return CheckpointIOError(f"checkpoint step {step} in {self.directory} is damaged: {problem}; {self._hint(step, intact)}")

    def _check(self, step: int) -> None:
        if problem := self.damage(step):
            raise self._damaged(step, problem)

    def pick_step(self, requested: int = 0) -> int | None:
        """The step to resume from: ``requested`` (> 0: ``train.resume_step``) or else the latest; None when
        there is no checkpoint (and nothing was requested). The step must exist and be intact (a
        ``CheckpointIOError`` otherwise); damaged earlier steps are logged; later steps are moved aside to
        ``<dir>.discarded/`` (the run writes them again)."""
        steps = self.steps()
        what = f"{self.resume_override or 'resume step'}={requested}"
        if requested < 0:
            raise CheckpointIOError(f"{what}: must be 0 (the latest step) or one of the checkpoint steps")
        if requested and requested not in steps:
            have = ", ".join(f"{s}" + (" (damaged)" if self.damage(s) else "") for s in steps) or "none"
            raise CheckpointIOError(f"{what}: {self.directory} has no checkpoint step {requested}; steps: {have}")
        step = requested or (steps[-1] if steps else None)
        if step is None:
            return None
        self._check(step)
        for s in steps:
            if s < step and (problem := self.damage(s)):
                log.warning("checkpoint step %d in %s is damaged and not used: %s", s, self.directory, problem)
        later = [s for s in steps if s > step]
        if later:
            self._discard(later)
            log.warning(
                "resuming from checkpoint step %d (%s): later steps %s moved to %s.discarded; drop the override "
                "for later resumes (it would go back to step %d again)",
                *(step, what, ", ".join(map(str, later)), self.directory, step),
            )
        return step

    def _discard(self, steps: list[int]) -> None:
        """Move ``steps`` to ``<dir>.discarded/<step>[.<n>]`` (process 0; every process then re-reads the steps)."""
        ocp.multihost.sync_global_processes("ra3-checkpoint-discard-start")
        if ocp.multihost.is_primary_host(0):
            dest = self.directory + ".discarded"
            os.makedirs(dest, exist_ok=True)
            for s in steps:
                target, n = os.path.join(dest, str(s)), 0
                while os.path.exists(target):
                    n += 1
                    target = os.path.join(dest, f"{s}.{n}")
                os.rename(os.path.join(self.directory, str(s)), target)
        ocp.multihost.sync_global_processes("ra3-checkpoint-discard-done")
        with quiet_orbax():
            self._mngr.reload()

    def _restore(self, step: int, composite):
        """``CheckpointManager.restore`` of a checked step, quietly; a failure is one line."""
        self._check(step)
        try:
            with quiet_orbax():
                return self._mngr.restore(step, args=composite)
        except Exception as e:
            intact = [s for s in self.steps() if s != step and self.damage(s) is None]
            raise CheckpointIOError(
                f"cannot restore checkpoint step {step} from {self.directory}: {_short(e)}; its files pass the checks, "
                f"so either its bytes are corrupt or the config does not match the run that wrote it; {self._hint(step, intact)}"
            ) from None

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
        out = self._restore(
            step,
            ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["data"], out["meta"]

    def restore_data(self, step: int) -> dict:
        """Only the JSON ``data`` item of a step (no arrays are read)."""
        out = self._restore(step, ocp.args.Composite(data=ocp.args.JsonRestore()))
        return out["data"]

    def restore_params(self, step: int, abstract_params):
        out = self._restore(
            step,
            ocp.args.Composite(
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
