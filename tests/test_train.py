"""NTP trainer: exact resume after SIGKILL, gradient accumulation, NaN detection, CLI errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from .conftest import CACHE, REPO

TINY = os.path.join(REPO, "configs", "tiny_cpu.yaml")


def _env():
    env = dict(os.environ)
    env["RA3_JAX_CACHE"] = os.path.join(CACHE, "jax_cache")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    return env


def _ra3(args, env=None, check=True):
    p = subprocess.run(
        [sys.executable, "-m", "ra3_jax.cli", *args], cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=600
    )
    if check and p.returncode != 0:
        raise AssertionError(f"ra3 {args[0]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def tiny_overrides(spm_tokenizer, tfds_dir):
    return [
        f"tokenizer.path={os.path.join(CACHE, 'spm512')}",
        f"data.tfds_dir={tfds_dir}",
        "train.progress=false",
        "mesh.data=2",
        "train.steps=12",
        "train.ckpt_every=4",
        "train.eval_every=6",
        "train.async_checkpoints=true",
    ]


def _losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}


def _final_params(out_dir):
    import jax

    from ra3_jax import sharding
    from ra3_jax.model.store import read_model_config, restore_params_from_dir

    cfg = read_model_config(out_dir)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return jax.device_get(restore_params_from_dir(out_dir, cfg, mesh))


def test_resume_after_sigkill_is_bitwise(tmp_path, tiny_overrides):
    straight = str(tmp_path / "straight")
    _ra3(["pretrain", "--config", TINY, *tiny_overrides, f"train.out_dir={straight}"])
    killed = str(tmp_path / "killed")
    env = _env()
    env["RA3_FAULT_KILL_AFTER_STEP"] = "pretrain:9"  # SIGKILL right after step 9 (step 8's async save may be in flight)
    p = _ra3(["pretrain", "--config", TINY, *tiny_overrides, f"train.out_dir={killed}"], env=env, check=False)
    assert p.returncode == -9, p.stderr[-2000:]
    ckpts = sorted(int(d) for d in os.listdir(os.path.join(killed, "checkpoints")) if d.isdigit())
    assert ckpts and max(ckpts) < 12
    _ra3(["pretrain", "--config", TINY, *tiny_overrides, f"train.out_dir={killed}"])
    (la, ea), (lb, eb) = _losses(straight), _losses(killed)
    assert sorted(la) == list(range(1, 13)) and la == lb and ea == eb  # identical loss curves, exactly
    assert la[12] < la[1]  # it learns
    assert 0 in ea and ea[12] < ea[0]  # held-out loss before training, and it improves
    pa, pb = _final_params(straight), _final_params(killed)
    import jax

    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), pa, pb)
    # train.stop_step=6 ends at step 6 of the 12-step schedule (an early checkpoint of it, exactly); continuing
    # without it reaches the uninterrupted run bitwise
    stopped = str(tmp_path / "stopped")
    _ra3(["pretrain", "--config", TINY, *tiny_overrides, f"train.out_dir={stopped}", "train.stop_step=6"])
    assert max(_losses(stopped)[0]) == 6 and _losses(stopped)[0] == {s: la[s] for s in range(1, 7)}
    _ra3(["pretrain", "--config", TINY, *tiny_overrides, f"train.out_dir={stopped}"])
    assert _losses(stopped)[0] == la
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), pa, _final_params(stopped))


def test_grad_accumulation_matches_full_batch():
    import jax

    from ra3_jax import sharding
    from ra3_jax.config import OptimSection
    from ra3_jax.train.state import create_state, make_optimizer, state_shardings
    from ra3_jax.train.step import jit_train_step

    from .test_sharding import CFG, _batch

    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    out = []
    for accum in (1, 4):
        from ra3_jax.model import init_params

        tx = make_optimizer(OptimSection(lr=1e-2, warmup_steps=1, grad_accum=accum), 10)
        state = create_state(init_params(CFG, jax.random.key(0), mesh), tx, CFG, mesh)
        step = jit_train_step(CFG, tx, accum, mesh, state_shardings(CFG, tx, mesh))
        state, m = step(state, _batch())
        out.append((jax.device_get(m), jax.device_get(state.params)))
    np.testing.assert_allclose(out[0][0]["loss"], out[1][0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(out[0][0]["grad_norm"], out[1][0]["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), out[0][1], out[1][1])


def test_nan_loss_is_a_clear_error_and_nothing_is_saved(tmp_path, tiny_overrides):
    out = str(tmp_path / "nan")
    p = _ra3(
        [
            "pretrain",
            "--config",
            TINY,
            *tiny_overrides,
            f"train.out_dir={out}",
            "optim.lr=1e30",
            "optim.clip_norm=0",
            "optim.warmup_steps=1",
            "optim.weight_decay=0",
        ],
        check=False,
    )
    assert p.returncode == 2
    assert "non-finite training signal" in p.stderr and "nan" in p.stderr and "Lower optim.lr" in p.stderr
    ck = os.path.join(out, "checkpoints")
    assert not os.path.isdir(ck) or not [d for d in os.listdir(ck) if d.isdigit()]


@pytest.mark.parametrize(
    "args,message",
    [
        (["train.stepz=3"], "unknown config key 'train.stepz'"),
        (["model.init=gguf", "model.path=/nonexistent/model.gguf"], "GGUF file not found"),
        (["data.source_dirs=/nonexistent_dir"], "corpus source directory not found"),
        (["tokenizer.path=/nonexistent_tok"], "sentencepiece model not found"),
    ],
)
def test_cli_errors_are_clear(args, message, tiny_overrides, tmp_path):
    p = _ra3(
        [
            "pretrain" if "model.init=gguf" not in args else "midtrain-ntp",
            "--config",
            TINY,
            *tiny_overrides,
            f"train.out_dir={tmp_path}",
            *args,
        ],
        check=False,
    )
    assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_cli_non_utf8_and_empty_corpus(tiny_overrides, tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    p = _ra3(["pretrain", "--config", TINY, *tiny_overrides, f"data.source_dirs={d}", f"train.out_dir={tmp_path}/o"], check=False)
    assert p.returncode == 2 and "empty corpus" in p.stderr
    (d / "x.py").write_bytes(b"s = '\xff\xfe'\n")
    p = _ra3(["pretrain", "--config", TINY, *tiny_overrides, f"data.source_dirs={d}", f"train.out_dir={tmp_path}/o"], check=False)
    assert p.returncode == 2 and "not valid UTF-8" in p.stderr and "x.py" in p.stderr


def test_convert_hf_then_eval_loss(tmp_path, tiny_overrides):
    """convert (HF safetensors -> Orbax model dir) then eval-loss on it; the loss equals a direct computation."""
    pytest.importorskip("transformers")
    from .test_model import _save_tiny_hf

    hf_dir = tmp_path / "hf"
    _save_tiny_hf("llama", hf_dir, vocab_size=512)
    from ra3_jax.tokenizer import SentencePieceTokenizer

    SentencePieceTokenizer(os.path.join(CACHE, "spm512")).save(str(hf_dir))  # the HF dir needs a tokenizer
    out = tmp_path / "conv"
    _ra3(["convert", "--from", "hf", "--path", str(hf_dir), "--out", str(out)])
    assert (out / "model_config.json").exists() and (out / "params").is_dir()
    ev_orbax = json.loads(
        _ra3(
            [
                "eval-loss",
                "--config",
                TINY,
                *tiny_overrides,
                "model.init=orbax",
                f"model.path={out}",
                "tokenizer.kind=auto",
                "data.seq_len=32",
            ]
        ).stdout
    )
    ev_hf = json.loads(
        _ra3(
            [
                "eval-loss",
                "--config",
                TINY,
                *tiny_overrides,
                "model.init=hf",
                f"model.path={hf_dir}",
                "tokenizer.kind=auto",
                "data.seq_len=32",
            ]
        ).stdout
    )
    bad = _ra3(
        [
            "eval-loss",
            "--config",
            TINY,
            *tiny_overrides,
            "model.init=orbax",
            f"model.path={out}",
            "tokenizer.kind=gguf",
            "tokenizer.path=smollm2",
        ],
        check=False,
    )
    assert bad.returncode == 2 and "tokenizer has 49152 tokens" in bad.stderr
    assert ev_orbax["eval/tokens"] > 0 and abs(ev_orbax["eval/loss"] - ev_hf["eval/loss"]) < 1e-5
    assert ev_orbax["eval/loss"] > 0 and ev_orbax["eval/bits_per_byte"] > 0
