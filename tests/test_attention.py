"""Every attention implementation against the XLA reference and against a naive per-token loop: forward and
gradient on packed segments with padding and GQA (the Pallas kernels in interpret mode on CPU), on one device
and per shard of a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ra3_jax.model.attention import dense, resolve, segment_mask, self_attention

B, T, K, G, DH = 2, 64, 2, 3, 16
# row 0: three packed documents; row 1: one document, then padding
SEGMENTS = np.array([[1] * 20 + [2] * 30 + [3] * 14, [1] * 50 + [0] * 14], np.int32)


def _inputs(seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, K, G, DH), jnp.float32)
    k = jax.random.normal(kk, (B, K, T, DH), jnp.float32)
    v = jax.random.normal(kv, (B, K, T, DH), jnp.float32)
    return q, k, v


def _naive(q, k, v, seg):
    """One query at a time, plain softmax over the keys it may see (earlier, same segment, not padding)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros(q.shape)
    for b in range(B):
        for t in range(T):
            if seg[b, t] == 0:
                continue
            keys = [s for s in range(t + 1) if seg[b, s] == seg[b, t]]
            for h in range(K * G):
                kv_h, g = divmod(h, G)
                sc = np.array([q[b, t, kv_h, g] @ k[b, kv_h, s] for s in keys]) / np.sqrt(DH)
                p = np.exp(sc - sc.max())
                out[b, t, kv_h, g] = (p / p.sum()) @ v[b, kv_h, keys]
    return out


REAL = SEGMENTS != 0  # pad queries' outputs are unspecified


def test_reference_equals_naive_loop():
    q, k, v = _inputs()
    out = dense(q, k, v, segment_mask(jnp.asarray(SEGMENTS), jnp.asarray(SEGMENTS)))
    np.testing.assert_allclose(np.asarray(out)[REAL], _naive(q, k, v, SEGMENTS)[REAL], atol=2e-5)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 5e-5), (jnp.bfloat16, 3e-2)])
def test_reference_gradient_equals_autodiff_of_a_plain_softmax(dtype, tol):
    """``dense`` has a closed-form backward (custom VJP); it equals autodiff through a plain 5-D einsum +
    jax.nn.softmax written here, float32 and bfloat16 inputs (cotangents in the inputs' dtype)."""
    q, k, v = (x.astype(dtype) for x in _inputs(2))
    mask = segment_mask(jnp.asarray(SEGMENTS), jnp.asarray(SEGMENTS))
    w = jax.random.normal(jax.random.key(5), (B, T, K, G, DH)) * jnp.asarray(REAL, jnp.float32)[:, :, None, None, None]

    def plain(q, k, v):
        s = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) / np.sqrt(DH)
        p = jax.nn.softmax(jnp.where(mask[:, None, None], s, -1e30), axis=-1).astype(v.dtype)
        return jnp.einsum("bkgts,bksd->btkgd", p, v)

    g = jax.grad(lambda *a: (dense(*a, mask).astype(jnp.float32) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: (plain(*a).astype(jnp.float32) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        assert a.dtype == b.dtype == dtype
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max())
    assert float(jnp.abs(g_ref[1].astype(jnp.float32)).max()) > 0.1


@pytest.mark.parametrize("impl,block", [("blocked", 16), ("blocked", 32), ("pallas", 32)])
def test_implementation_matches_reference_forward_and_gradient(impl, block):
    assert resolve(impl, T, block) == impl  # the implementation itself runs, not a fallback
    q, k, v = _inputs(1)
    seg = jnp.asarray(SEGMENTS)
    w = jax.random.normal(jax.random.key(9), (B, T, K, G, DH)) * jnp.asarray(REAL, jnp.float32)[:, :, None, None, None]

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * w).sum()  # a loss that reads only real queries

    ref_fn = lambda q, k, v: self_attention(q, k, v, seg, impl="xla")
    fn = lambda q, k, v: self_attention(q, k, v, seg, impl=impl, block=block)
    out = np.asarray(fn(q, k, v))
    assert np.isfinite(out).all()  # pad queries too: unspecified, but never NaN
    np.testing.assert_allclose(out[REAL], np.asarray(ref_fn(q, k, v))[REAL], atol=2e-5)
    g = jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(loss(ref_fn), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)
    assert float(jnp.abs(g_ref[1]).max()) > 0.1  # the gradient is not trivially zero


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="auto is platform-dependent")
def test_resolution_by_platform_and_shape():
    assert resolve("auto", 512, 128) == "blocked"  # CPU (the test platform)
    assert resolve("blocked", 100, 32) == "xla" and resolve("blocked", 64, 64) == "xla"  # ragged / one block
    assert resolve("pallas", 32, 64) == "pallas" and resolve("pallas", 256, 128) == "pallas"  # tile capped at T
    # flash tiles must be powers of two >= 16 dividing T (the backward's 64-token tile too)
    assert resolve("pallas", 96, 64) == "xla" and resolve("pallas", 96, 128) == "xla" and resolve("pallas", 8, 128) == "xla"
    with pytest.raises(ValueError, match="not one of"):
        self_attention(*_inputs(), jnp.asarray(SEGMENTS), impl="flash")
    with pytest.raises(ValueError, match="attention_block"):
        resolve("blocked", 64, 0)


# splash needs tiles of 128: three of them here, with the same kinds of rows (packed, padded) and GQA
T_SPLASH = 384
SEG_SPLASH = np.array([[1] * 100 + [2] * 150 + [3] * 134, [1] * 300 + [0] * 84], np.int32)


def test_splash_matches_reference_forward_and_gradient():
    """Splash (interpret mode) over 3 query and key tiles, so the skipped blocks above the diagonal and blocks
    crossing a segment boundary both occur; forward and gradient equal the reference on real queries."""
    assert resolve("splash", T_SPLASH, 128) == "splash" and resolve("splash", 64, 128) == "xla"
    assert resolve("splash", 1024, 128) == "splash" and resolve("splash", 200, 128) == "xla"
    seg, real = jnp.asarray(SEG_SPLASH), SEG_SPLASH != 0
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (B, T_SPLASH, K, G, DH))
    k, v = (jax.random.normal(x, (B, K, T_SPLASH, DH)) for x in ks[1:3])
    w = jax.random.normal(ks[3], q.shape) * jnp.asarray(real, jnp.float32)[:, :, None, None, None]
    out = {i: self_attention(q, k, v, seg, impl=i) for i in ("xla", "splash")}
    assert np.isfinite(np.asarray(out["splash"])).all()
    np.testing.assert_allclose(np.asarray(out["splash"])[real], np.asarray(out["xla"])[real], atol=2e-5)
    loss = lambda impl: lambda *a: (self_attention(*a, seg, impl=impl) * w).sum()
    grads = {i: jax.grad(loss(i), argnums=(0, 1, 2))(q, k, v) for i in out}
    for a, b in zip(grads["splash"], grads["xla"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)
    assert float(jnp.abs(grads["xla"][1]).max()) > 0.1


def _collectives(hlo: str) -> dict:
    names = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
    return {n: hlo.count(n + "(") + hlo.count(n + "-start(") for n in names if n + "(" in hlo or n + "-start(" in hlo}


def test_splash_kernel_is_traced_again_at_other_shapes():
    """The kernel is built once per (heads, length) and cached; built first inside a trace, it must hold no
    tracer: a second jit at another batch size, and a gradient traced after an ``eval_shape`` of the same loss
    (what gradient accumulation does), both run and agree with the reference."""
    from ra3_jax.model import attention

    attention._splash_kernel.cache_clear()
    seg, real = jnp.asarray(SEG_SPLASH), SEG_SPLASH != 0
    q = jax.random.normal(jax.random.key(6), (B, T_SPLASH, K, G, DH))
    k, v = (jax.random.normal(jax.random.key(s), (B, K, T_SPLASH, DH)) for s in (7, 8))
    ref = np.asarray(self_attention(q, k, v, seg, impl="xla"))
    run = jax.jit(lambda *a: self_attention(*a, impl="splash"))
    for rows in (slice(0, 2), slice(1, 2)):
        out = np.asarray(run(q[rows], k[rows], v[rows], seg[rows]))
        np.testing.assert_allclose(out[real[rows]], ref[rows][real[rows]], atol=2e-5)
    w = jnp.asarray(real, jnp.float32)[:, :, None, None, None]
    loss = lambda q: ((self_attention(q, k, v, seg, impl="splash") * w) ** 2).sum()
    g = jax.jit(lambda q: (jax.eval_shape(loss, q), jax.grad(loss)(q))[1])(q)
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0


@pytest.mark.parametrize(
    "impl,T_,K_,G_,B_,expect",
    [
        ("pallas", T, K, G, 4, set()),
        ("splash", T_SPLASH, K, G, 4, set()),  # three tiles per shard: blocks above the diagonal skipped
        # one kv head: its 6 query heads split over tensor; dK, dV summed over their shards
        ("splash", 256, 1, 6, 4, {"all-reduce"}),
        ("pallas", T, K, G, 2, None),  # 2 rows on data x fsdp = 4: replicated over fsdp, gradient summed
    ],
)
def test_kernels_run_per_shard_on_a_mesh(impl, T_, K_, G_, B_, expect):
    """On 8 devices (data 2 x fsdp 2 x tensor 2), with the inputs sharded as the model's layers leave them (rows
    over data and fsdp, query heads over tensor), a kernel's gradient traced under ``traced_on`` equals the
    single-device reference and, where the rows and kv heads divide the mesh axes, compiles without a collective;
    the same function traced without the mesh (XLA cannot partition a pallas_call) moves data between devices."""
    from jax.sharding import NamedSharding

    from ra3_jax.model.attention import traced_on
    from ra3_jax.sharding import logical_to_spec, make_mesh

    mesh = make_mesh(2, 2, 2)
    seg = np.ones((B_, T_), np.int32)
    seg[0, T_ // 3 :], seg[1, T_ // 2 :] = 2, 0
    seg[B_ - 1, 5:] = 7
    ks = jax.random.split(jax.random.key(4), 4)
    q = jax.random.normal(ks[0], (B_, T_, K_, G_, DH))
    k, v = (jax.random.normal(x, (B_, K_, T_, DH)) for x in ks[1:3])
    w = jax.random.normal(ks[3], q.shape) * jnp.asarray(seg != 0, jnp.float32)[:, :, None, None, None]
    loss = lambda impl_: lambda q, k, v, s: (self_attention(q, k, v, s, impl=impl_, block=32) * w).sum()
    assert resolve(impl, T_, 32) == impl
    g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v, jnp.asarray(seg))

    shard = lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh))
    q_axes = ("batch", None, "kv_heads", None, None) if K_ % 2 == 0 else ("batch", None, None, "q_heads", None)
    q_s, kv_s = shard(q_axes, q), shard(("batch", "kv_heads", None, None), k)
    seg_s = shard(("batch", None), seg)
    args = (jax.device_put(q, q_s), jax.device_put(k, kv_s), jax.device_put(v, kv_s), jax.device_put(seg, seg_s))
    grad = jax.grad(loss(impl), argnums=(0, 1, 2))
    sharded = jax.jit(traced_on(mesh, grad), out_shardings=(q_s, kv_s, kv_s))
    for a, b in zip(sharded(*args), g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)
    assert float(jnp.abs(g_ref[1]).max()) > 0.1
    if expect is not None:
        assert set(_collectives(sharded.lower(*args).compile().as_text())) == expect
        unsharded = jax.jit(grad, out_shardings=(q_s, kv_s, kv_s))
        assert _collectives(unsharded.lower(*args).compile().as_text())  # the negative control


def test_model_forward_is_the_same_with_every_implementation():
    """The whole decoder (packed segments, GQA) gives the same logits and loss gradient with each implementation."""
    from ra3_jax.model.llama import LlamaConfig, forward
    from ra3_jax.model.params import init_params

    cfg = LlamaConfig(vocab_size=97, d_model=96, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=96, max_seq_len=T)
    params = init_params(cfg, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (B, T), 1, 97)
    seg = jnp.asarray(SEGMENTS)
    pos = jnp.asarray(np.concatenate([np.arange(20), np.arange(30), np.arange(14)])[None].repeat(B, 0), jnp.int32)

    def loss(p, impl, block):
        logits, _ = forward(p, toks, pos, cfg.replace(attention=impl, attention_block=block), segment_ids=seg)
        return (jax.nn.log_softmax(logits)[..., 0] * jnp.asarray(REAL)).sum(), logits

    (l_ref, lg_ref), g_ref = jax.value_and_grad(loss, has_aux=True)(params, "xla", 128)
    for impl, block in [("blocked", 16), ("pallas", 32)]:
        (lv, lg), g = jax.value_and_grad(loss, has_aux=True)(params, impl, block)
        assert np.isfinite(np.asarray(lg)).all() and np.isfinite(float(lv))
        np.testing.assert_allclose(np.asarray(lg)[REAL], np.asarray(lg_ref)[REAL], atol=1e-4)
        np.testing.assert_allclose(float(lv), float(l_ref), rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), g, g_ref)


def test_decode_reads_a_bucketed_cache_length_with_the_same_result():
    """Cached attention over the first L slots (L: the smallest bucket holding every written slot) gives the same
    logits as reading all S slots, at every cache fill, for prefill-then-decode with left padding."""
    from ra3_jax.model.llama import KVCache, LlamaConfig, attended_bucket, attended_lengths, forward
    from ra3_jax.model.params import init_params

    assert attended_lengths(64, 4) == [16, 32, 48, 64] and attended_lengths(100, 4) == [32, 56, 80, 100]
    assert attended_lengths(24, 4) == [24] and attended_lengths(64, 1) == [64]
    sizes = [16, 32, 48, 64]  # index = slots written so far: 16 fit the first bucket, 17 need the second
    assert [int(attended_bucket(sizes, i)) for i in (1, 16, 17, 47, 48, 49, 64)] == [0, 0, 1, 2, 2, 3, 3]
    cfg = LlamaConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    params = init_params(cfg, jax.random.key(2))
    rng = np.random.default_rng(0)
    P, S, B2 = 8, 64, 3
    seg = np.ones((B2, P), np.int32)
    seg[1, :3] = 0  # a left-padded row
    toks = jnp.asarray(rng.integers(1, 61, (B2, P)), jnp.int32)
    pos = jnp.asarray(np.maximum(np.cumsum(seg, 1) - 1, 0), jnp.int32)
    new_toks = [jnp.asarray(rng.integers(1, 61, (B2, 1)), jnp.int32) for _ in range(50)]  # crosses 16, 32 and 48
    out = {}
    for n in (1, 4):
        c = cfg.replace(decode_buckets=n)
        logits, cache = forward(
            params, toks, pos, c, segment_ids=jnp.asarray(seg), cache=KVCache.init(c, B2, S), empty_cache=True
        )
        steps, p = [logits], pos[:, -1:]
        for nxt in new_toks:
            p = p + 1
            lg, cache = forward(params, nxt, p, c, cache=cache)
            steps.append(lg)
        out[n] = steps
    real = seg[:, -1] != 0
    for a, b in zip(out[1], out[4]):
        np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-5)


def test_blocked_bfloat16_gradient_is_close_to_float32_reference():
    """The blocked attention's own VJP (dK/dV summed over query blocks in float32, rounded once; dS^T and P^T as
    row-major copies) in bfloat16 stays within bfloat16 rounding of the float32 reference gradient."""
    q, k, v = _inputs(3)
    seg = jnp.asarray(SEGMENTS)
    w = jax.random.normal(jax.random.key(4), (B, T, K, G, DH)) * jnp.asarray(REAL, jnp.float32)[:, :, None, None, None]

    def grads(impl, dtype):
        f = lambda q, k, v: (self_attention(q, k, v, seg, impl=impl, block=16).astype(jnp.float32) * w).sum()
        return jax.grad(f, argnums=(0, 1, 2))(*(x.astype(dtype) for x in (q, k, v)))

    ref = grads("xla", jnp.float32)
    for a, b in zip(grads("blocked", jnp.bfloat16), ref):
        assert a.dtype == jnp.bfloat16
        a, b = np.asarray(a, np.float32), np.asarray(b)
        np.testing.assert_allclose(a, b, atol=3e-2 * np.abs(b).max())
        assert np.abs(b).max() > 0.1
