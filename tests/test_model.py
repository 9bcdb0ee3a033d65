"""Model numerics against HF transformers (CPU torch) on the same weights, and internal invariants."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ra3_jax.model import KVCache, LlamaConfig, forward, init_params
from ra3_jax.model.convert import _unpermute_rows, load_hf
from ra3_jax.model.matmul import layout_copies, matmul, matmul_t, matmuls

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PARITY_TOL = 2e-4  # max abs logit difference, float32, logits of magnitude ~10


def _save_tiny_hf(kind, path, **kw):
    torch.manual_seed(0)
    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        rms_norm_eps=1e-6,
    )
    common.update(kw)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=5000.0, tie_word_embeddings=False, **common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(rope_theta=20000.0, tie_word_embeddings=True, **common))
        with torch.no_grad():  # HF inits biases to zero; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logits_match_hf_transformers(kind, tmp_path):
    hf = _save_tiny_hf(kind, tmp_path)
    cfg, params = load_hf(str(tmp_path))
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.tie_embeddings == (kind == "qwen2")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 40))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    ours, _ = forward(params, tokens, np.broadcast_to(np.arange(40), (2, 40)), cfg)
    err = np.abs(np.asarray(ours) - ref).max()
    print(f"{kind}: max |logit diff| = {err:.2e} (logit scale {np.abs(ref).max():.1f})")
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero numbers
    assert err < PARITY_TOL


def _tiny(**kw):
    base = dict(vocab_size=97, d_model=48, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=96, rope_theta=1000.0)
    base.update(kw)
    return LlamaConfig(**base)


def test_interleaved_rope_layout_equals_half_with_permuted_weights():
    """GGUF files store Q/K rows permuted for interleaved RoPE; both layouts must compute the same function."""
    cfg = _tiny()
    p = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(1)))

    # Build "GGUF" weights: permute HF rows (the inverse of _unpermute_rows) for every layer.
    def permute(w, heads):  # llama.cpp convert_hf_to_gguf.permute on [out, in]
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    q = np.stack([permute(w.T, cfg.n_heads).T for w in p["layers"]["wq"]])
    k = np.stack([permute(w.T, cfg.n_kv_heads).T for w in p["layers"]["wk"]])
    np.testing.assert_array_equal(np.stack([_unpermute_rows(w.T, cfg.n_heads).T for w in q]), p["layers"]["wq"])
    p_int = {**p, "layers": {**p["layers"], "wq": q, "wk": k}}
    toks = np.arange(30).reshape(2, 15) % cfg.vocab_size
    pos = np.broadcast_to(np.arange(15), (2, 15))
    a, _ = forward(p, toks, pos, cfg)
    b, _ = forward(p_int, toks, pos, cfg.replace(rope_layout="interleaved"))
    np.testing.assert_allclose(a, b, atol=1e-5)


def _model_and_batch(seed, T):
    cfg = _tiny()
    p = init_params(cfg, jax.random.key(seed))
    toks = jax.random.randint(jax.random.key(seed + 1), (2, T), 0, cfg.vocab_size)
    return cfg, p, toks, jnp.broadcast_to(jnp.arange(T), (2, T))


def test_kv_cache_incremental_equals_full_forward():
    cfg, p, toks, pos = _model_and_batch(2, 12)
    full, _ = forward(p, toks, pos, cfg)
    cache = KVCache.init(cfg, 2, 16)
    chunks = []
    for lo, hi in [(0, 5), (5, 6), (6, 7), (7, 12)]:
        out, cache = forward(p, toks[:, lo:hi], pos[:, lo:hi], cfg, cache=cache)
        chunks.append(out)
    np.testing.assert_allclose(jnp.concatenate(chunks, 1), full, atol=2e-5)
    assert int(cache.index) == 12


def test_packed_segments_do_not_attend_to_each_other():
    cfg = _tiny()
    p = init_params(cfg, jax.random.key(4))
    a = jax.random.randint(jax.random.key(5), (1, 7), 0, cfg.vocab_size)
    b = jax.random.randint(jax.random.key(6), (1, 9), 0, cfg.vocab_size)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 4), jnp.int32)], 1)
    seg = jnp.array([[1] * 7 + [2] * 9 + [0] * 4])
    pos = jnp.array([list(range(7)) + list(range(9)) + [0] * 4])
    out, _ = forward(p, packed, pos, cfg, segment_ids=seg)
    ra, _ = forward(p, a, jnp.arange(7)[None], cfg)
    rb, _ = forward(p, b, jnp.arange(9)[None], cfg)
    np.testing.assert_allclose(out[:, :7], ra, atol=2e-5)
    np.testing.assert_allclose(out[:, 7:16], rb, atol=2e-5)


def test_scan_remat_and_unrolled_agree():
    cfg, p, toks, pos = _model_and_batch(7, 10)

    def loss(params, c):
        return forward(params, toks, pos, c)[0].mean()

    ref_l, ref_g = jax.value_and_grad(loss)(p, cfg)
    for variant in (cfg.replace(scan_layers=False), cfg.replace(remat="full"), cfg.replace(remat="dots")):
        val, g = jax.value_and_grad(loss)(p, variant)
        np.testing.assert_allclose(val, ref_l, rtol=1e-5)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), g, ref_g)


def test_bfloat16_compute_is_close_to_float32():
    cfg, p, toks, pos = _model_and_batch(9, 10)
    f32, _ = forward(p, toks, pos, cfg)
    bf16, _ = forward(p, toks, pos, cfg.replace(compute_dtype="bfloat16"))
    assert bf16.dtype == jnp.float32  # logits are always returned in float32
    assert np.abs(np.asarray(bf16) - np.asarray(f32)).max() < 0.1 * np.abs(np.asarray(f32)).max()


def test_cpu_dense_gradient_equals_autodiff_of_the_plain_product(monkeypatch):
    """On the CPU the dense layers' weight gradient comes from a custom VJP (an explicit transposed copy of the
    input, model/matmul.py ``_matmul_cpu``), and so does the MLP's silu(gate) * up (``swiglu``); the whole model's
    loss gradient equals autodiff of the plain ``x @ w`` and ``silu(gate) * up`` (tied and untied heads, remat,
    bfloat16 compute: every gradient keeps its parameter's dtype)."""
    from ra3_jax.model import llama

    assert jax.default_backend() == "cpu"
    cfg, _, toks, pos = _model_and_batch(11, 10)

    def grads(c):
        pc = init_params(c, jax.random.key(11))
        return jax.value_and_grad(lambda q: (forward(q, toks, pos, c)[0] ** 2).mean())(pc)

    variants = (
        cfg,
        cfg.replace(tie_embeddings=not cfg.tie_embeddings),
        cfg.replace(remat="dots"),
        cfg.replace(compute_dtype="bfloat16"),
    )
    ours = [grads(c) for c in variants]
    with monkeypatch.context() as m:
        m.setattr(llama, "matmul", lambda x, w: x @ w)
        m.setattr(llama, "matmul_t", lambda x, w: x @ w.T)
        m.setattr(llama, "matmuls", lambda x, ws: tuple(x @ w for w in ws))
        m.setattr(llama, "swiglu", lambda gate, up: jax.nn.silu(gate) * up)
        plain = [grads(c) for c in variants]
    for c, (v, g), (v_ref, g_ref) in zip(variants, ours, plain):
        tol = 2e-2 if c.compute_dtype == "bfloat16" else 1e-5
        np.testing.assert_allclose(v, v_ref, rtol=tol)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(a, b, atol=tol * max(1.0, float(jnp.abs(b).max())), rtol=tol)


def test_cpu_products_sharing_an_input_save_it_once(capsys):
    """``matmuls`` (q, k, v; gate, up) saves its shared input once for the backward (as x^T), where a ``matmul``
    per weight saved a copy each (in a scan: one stacked [L, N, D] buffer each); its gradient, dX summed in
    float32, equals autodiff of the plain products."""
    from jax.ad_checkpoint import print_saved_residuals

    x = jax.random.normal(jax.random.key(0), (12, 8))
    ws = [jax.random.normal(jax.random.key(i), (8, 5)) for i in (1, 2, 3)]
    shared = lambda x, *ws: sum((o**2).sum() for o in matmuls(x, ws))
    each = lambda x, *ws: sum((matmul(x, w) ** 2).sum() for w in ws)
    plain = lambda x, *ws: sum(((x @ w) ** 2).sum() for w in ws)
    for f, copies in ((shared, 1), (each, 3)):
        print_saved_residuals(f, x, *ws)
        assert capsys.readouterr().out.count("f32[8,12]") == copies  # x^T
    for a, b in zip(jax.grad(shared, argnums=(0, 1, 2, 3))(x, *ws), jax.grad(plain, argnums=(0, 1, 2, 3))(x, *ws)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _dot_operand_types(hlo: str) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in compiled HLO text, each operand's type read from its definition
    in the same computation (an instruction or a parameter of the computation's signature)."""
    out = []
    for comp in re.split(r"\n(?=\S)", hlo):  # one computation per top-level block
        header = comp.split("\n", 1)[0]
        for m in re.finditer(r"dot\(%([\w.\-]+), %([\w.\-]+)\)", comp):
            types = []
            for name in m.groups():
                d = re.search(rf"%{re.escape(name)} = (\w+)\[", comp) or re.search(rf"\b{re.escape(name)}: (\w+)\[", header)
                types.append(d.group(1) if d else "?")
            out.append(tuple(types))
    return out


def _updates_of_converted_buffers(hlo: str) -> list[str]:
    """Dynamic-update-slices whose buffer is a convert: XLA:CPU's float normalization of a bfloat16 update (the
    whole stacked buffer converted to float32 and back for every slice written)."""
    converts = set(re.findall(r"(%[\w.\-]+) = f32\[[^\]]*\]\S* convert\(", hlo))
    return [b for b in re.findall(r"dynamic-update-slice\((%[\w.\-]+)", hlo) if b in converts]


@pytest.mark.parametrize("scan", [True, False])
def test_cpu_bfloat16_step_keeps_every_dot_in_bfloat16(scan):
    """In bfloat16 compute on the CPU, every matmul of the forward and backward -- dense layers, the blocked
    attention's scores and values, the LM head -- takes bfloat16 operands. A dot XLA:CPU's YNNPACK kernels cannot
    take in bfloat16 (one returning bfloat16, or one whose left operand is contracted on its leading axis: dW =
    x^T g, dK = dS^T Q) is converted to float32 and runs ~4x slower on an AMX CPU (model/matmul.py ``_dot_f32``
    and ``transposed_copy``). With the layers in a scan, the residuals the scan stacks are written in place: none
    is a bfloat16 update normalized to float32 over the whole stacked buffer (``to_residual``)."""
    assert jax.default_backend() == "cpu"
    cfg = _tiny().replace(compute_dtype="bfloat16", attention="blocked", attention_block=16, scan_layers=scan)
    T = 48  # three attention blocks
    p = init_params(cfg, jax.random.key(3))
    toks = jax.random.randint(jax.random.key(4), (2, T), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    loss = lambda q: (forward(q, toks, pos, cfg)[0] ** 2).mean()
    with layout_copies(True):  # as with one device (the tests run 8 fake CPU devices)
        hlo = jax.jit(jax.grad(loss)).lower(p).compile().as_text()
    dots = _dot_operand_types(hlo)
    n_dense = 7 * (1 if scan else cfg.n_layers) + 1  # q, k, v, o, gate, up, down per layer (once: scan body); head
    assert len(dots) >= 3 * n_dense  # forward, dX and dW of each (attention's dots come on top)
    assert all(t == ("bf16", "bf16") for t in dots), sorted(set(dots))
    if scan:
        assert hlo.count("dynamic-update-slice(") >= 10  # the stacked residuals
    assert _updates_of_converted_buffers(hlo) == []


def test_cpu_dense_gradient_under_a_mesh_gathers_nothing():
    """With several devices the CPU products' transposed copies are optimization-barrier copies, not layout
    constraints: XLA does not partition a layout constraint and would all-gather the token-sharded activations
    onto every device for each weight gradient. The gradients match the plain product either way."""
    assert jax.device_count() == 8
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    x = jax.device_put(jax.random.normal(jax.random.key(0), (64, 24)), shard)
    w = jax.random.normal(jax.random.key(1), (24, 40))
    e = jax.random.normal(jax.random.key(2), (40, 24))
    loss = lambda x, w, e: (matmul(x, w) ** 2).sum() + (matmul_t(x, e) ** 2).sum()
    step = jax.jit(jax.grad(loss, argnums=(1, 2)))
    assert "all-gather" not in step.lower(x, w, e).compile().as_text()
    ref = jax.grad(lambda x, w, e: ((x @ w) ** 2).sum() + ((x @ e.T) ** 2).sum(), argnums=(1, 2))(x, w, e)
    for a, b in zip(step(x, w, e), ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
