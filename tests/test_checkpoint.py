"""Damaged checkpoints explain themselves: one line naming the step, the damaged file, the intact steps and the
``train.resume_step`` override that resumes from one; resuming with it works (unit level on RunCheckpointer, and
one end-to-end CLI run)."""

import gc
import glob
import json
import logging
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ra3_jax.train.checkpoint import CheckpointIOError, RunCheckpointer

from .conftest import CACHE
from .test_train import TINY, _losses, _ra3

ABSTRACT = {"w": jax.ShapeDtypeStruct((1000,), jnp.float32), "b": {"x": jax.ShapeDtypeStruct((7, 3), jnp.float32)}}


def _state(s: int) -> dict:
    return {"w": jnp.arange(1000, dtype=jnp.float32) * s, "b": {"x": jnp.full((7, 3), float(s))}}


@pytest.fixture
def three_steps(tmp_path) -> str:
    """A checkpoint directory with steps 4, 8, 12 of a small state (keep 3)."""
    d = str(tmp_path / "checkpoints")
    ck = RunCheckpointer(d, keep=3, async_save=False)
    for s in (4, 8, 12):
        ck.save(s, _state(s), {"pos": [1, s]}, {"step": s})
    ck.close()
    return d


def _truncate_array_file(d: str, step: int) -> str:
    """Truncate the largest array data file of the step's ``state`` item to half; returns its relative path."""
    f = max(glob.glob(os.path.join(d, str(step), "state", "ocdbt.process_*", "d", "*")), key=os.path.getsize)
    os.truncate(f, os.path.getsize(f) // 2)
    return os.path.relpath(f, d)


def _garbage_manifest(d: str, step: int) -> str:
    with open(os.path.join(d, str(step), "state", "manifest.ocdbt"), "wb") as f:
        f.write(b"not an ocdbt manifest at all\n")
    return f"{step}/state/manifest.ocdbt"


def _truncate_data_metadata(d: str, step: int) -> str:
    os.truncate(os.path.join(d, str(step), "data", "metadata"), 5)
    return f"{step}/data/metadata"


def _empty_checkpoint_metadata(d: str, step: int) -> str:
    open(os.path.join(d, str(step), "_CHECKPOINT_METADATA"), "w").close()
    return f"{step}/_CHECKPOINT_METADATA"


DAMAGES = {
    "truncated array file": (_truncate_array_file, "is truncated"),
    "garbage manifest.ocdbt": (_garbage_manifest, "is not a readable OCDBT manifest"),
    "truncated data metadata": (_truncate_data_metadata, "is not valid JSON"),
    "empty _CHECKPOINT_METADATA": (_empty_checkpoint_metadata, "is empty"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_latest_step_is_one_line_and_resume_step_recovers(three_steps, damage, caplog, capfd):
    d = three_steps
    damage_fn, what = DAMAGES[damage]
    rel = damage_fn(d, 12)
    ck = RunCheckpointer(d, keep=3, async_save=False)
    with pytest.raises(CheckpointIOError) as err:
        ck.restore(ck.pick_step(), ABSTRACT)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"checkpoint step 12 in {d} is damaged: {rel} {what}"), msg
    assert msg.endswith("intact steps: 4, 8; resume from one with train.resume_step=8"), msg
    # nothing else reached the user: no Orbax / absl ERROR logs, no tracebacks or TensorStore dumps on stderr
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in capfd.readouterr().err

    # train.resume_step=8: step 8 restores, step 12 is moved aside, and the run can write step 12 again
    assert ck.pick_step(8) == 8
    state, data, meta = ck.restore(8, ABSTRACT)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(1000) * 8.0)
    assert data == {"pos": [1, 8]} and meta == {"step": 8}  # the data item as JSON gives it back
    assert ck.steps() == [4, 8] and os.listdir(d + ".discarded") == ["12"]
    ck.save(12, _state(120), {"pos": [1, 120]}, {"step": 12})
    ck.wait()
    assert ck.steps() == [4, 8, 12] and ck.damage(12) is None
    assert ck.restore(12, ABSTRACT)[1] == {"pos": [1, 120]}
    ck.close()


def test_resume_step_that_does_not_exist_lists_the_steps(three_steps):
    _empty_checkpoint_metadata(three_steps, 4)
    ck = RunCheckpointer(three_steps, async_save=False)
    with pytest.raises(
        CheckpointIOError, match=r"^train.resume_step=5: .* has no checkpoint step 5; steps: 4 \(damaged\), 8, 12$"
    ):
        ck.pick_step(5)
    with pytest.raises(CheckpointIOError, match="train.resume_step=-1: must be 0"):
        ck.pick_step(-1)
    assert ck.steps() == [4, 8, 12]  # nothing moved
    ck.close()


def test_damaged_earlier_step_is_a_warning_not_an_error_log(three_steps, caplog):
    _empty_checkpoint_metadata(three_steps, 4)
    with caplog.at_level(logging.WARNING):
        ck = RunCheckpointer(three_steps, async_save=False)
        assert ck.pick_step() == 12
    ck.close()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint step 4" in m and "4/_CHECKPOINT_METADATA is empty" in m for m in warned), warned


def test_checkpoints_without_resume_override_say_how_to_use_an_intact_step(three_steps):
    """E-step checkpoints / model loading: train.resume_step does not apply, the message says what does."""
    rel = _truncate_data_metadata(three_steps, 12)
    ck = RunCheckpointer(three_steps, async_save=False, resume_override=None)
    with pytest.raises(CheckpointIOError) as err:
        ck.restore_data(ck.pick_step())
    msg = str(err.value)
    assert rel in msg and "intact steps: 4, 8" in msg and "train.resume_step does not apply" in msg
    assert msg.endswith(f"move {os.path.join(three_steps, '12')} aside to use step 8"), msg
    ck.close()


def test_a_config_mismatch_is_one_line_without_tensorstore_dumps(three_steps, monkeypatch):
    """... and the aborted read leaves no unraisable noise behind (its read coroutines, closed by the garbage
    collector, raised "Encountered error while reading array index" from their GeneratorExit), while any other
    unraisable error still reaches the hook that was there before."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    ck = RunCheckpointer(three_steps, async_save=False)
    wrong = {**ABSTRACT, "w": jax.ShapeDtypeStruct((500,), jnp.float32)}
    with pytest.raises(CheckpointIOError) as err:
        ck.restore(12, wrong)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("cannot restore checkpoint step 12") and "TensorStore" not in msg
    assert "config does not match" in msg
    ck.close()
    del err
    gc.collect()
    assert seen == [], [repr(u.exc_value)[:200] for u in seen]
    other = types.SimpleNamespace(exc_value=ValueError("unrelated"), object=None)
    sys.unraisablehook(other)
    assert seen == [other]


def test_cli_damaged_step_then_resume_step(tmp_path, spm_tokenizer, tfds_dir):
    """End to end: 12 steps (checkpoints 4, 8, 12), step 12's array file truncated -> exit 2 with one line on
    stderr; `train.resume_step=8` resumes and reproduces the undamaged run's step-12 loss exactly."""
    out = str(tmp_path / "run")
    args = [
        "pretrain",
        "--config",
        TINY,
        f"tokenizer.path={os.path.join(CACHE, 'spm512')}",
        f"data.tfds_dir={tfds_dir}",
        "train.progress=false",
        "mesh.data=2",
        "train.steps=12",
        "train.ckpt_every=4",
        "train.keep_checkpoints=3",
        "train.eval_every=0",
        f"train.out_dir={out}",
    ]
    _ra3(args)
    want, _ = _losses(out)
    ckpts = os.path.join(out, "checkpoints")
    rel = _truncate_array_file(ckpts, 12)
    p = _ra3(args, check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr[-3000:]
    assert f"checkpoint step 12 in {ckpts} is damaged: {rel} is truncated" in lines[0]
    assert lines[0].endswith("intact steps: 4, 8; resume from one with train.resume_step=8"), lines[0]
    p = _ra3([*args, "train.resume_step=8"])
    assert "Traceback" not in p.stderr
    got, _ = _losses(out)
    assert got == want  # steps 9..12 again, bit for bit
    assert json.load(open(os.path.join(ckpts, "12", "meta", "metadata")))["step"] == 12
    assert os.listdir(ckpts + ".discarded") == ["12"]
