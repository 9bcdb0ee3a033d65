"""Shared-prefix continuation scoring against independent references: token_logprobs on the full sequences
(values and the exact gradient), a plain cached forward with full logits (the cache-held-constant gradient),
and the jaxpr / compiled memory of the chunked LM head (no [R*C, V] intermediate)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ra3_jax.model import KVCache, LlamaConfig, forward, init_params
from ra3_jax.objectives.continuation import continuation_logprobs, policy_logprobs, prefix_cache, repeat_cache
from ra3_jax.objectives.ntp import token_logprobs

CFG = LlamaConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256)
ATOL = 1e-4  # cached + chunked vs one teacher-forced pass, float32
GRAD_RTOL = 1e-4
PREFIX_LENS = [0, 5, 9]  # ragged, one empty prefix
K = 3  # continuations per prefix
P, C = 10, 7  # prefix / continuation slots; R*C = 63
CHUNK = 10  # does not divide R*C


@pytest.fixture(scope="module")
def params():
    p = init_params(CFG, jax.random.key(0))  # scaled up: peaked, position-dependent distributions
    return jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, p)


def make_case(rng, prefix_lens, k, P, C, vocab):
    """Random documents: row r = i*k + j is prefix_i + continuation r (cont_lengths[r] inputs, one more token
    as the last target). Returns the padded arrays of the API and the full sequences (lists)."""
    n, R = len(prefix_lens), len(prefix_lens) * k
    prefixes = [rng.integers(1, vocab, size=p).tolist() for p in prefix_lens]
    cont_lengths = rng.integers(1, C + 1, size=R).astype(np.int32)
    cont_lengths[0] = C  # one full row
    left, right = np.zeros((n, P), np.int32), np.zeros((n, P), np.int32)
    for i, p in enumerate(prefixes):
        left[i, P - len(p) :], right[i, : len(p)] = p, p
    cont, targets, seqs = np.zeros((R, C), np.int32), np.zeros((R, C), np.int32), []
    for r in range(R):
        y = rng.integers(1, vocab, size=cont_lengths[r] + 1).tolist()
        cont[r, : len(y) - 1], targets[r, : len(y) - 1] = y[:-1], y[1:]
        seqs.append(prefixes[r // k] + y)
    score_mask = (rng.random((R, C)) < 0.7).astype(np.int32)
    case = dict(left=left, right=right, plen=np.array(prefix_lens, np.int32), cont=cont, clen=cont_lengths)
    return case | dict(targets=targets, mask=score_mask, seqs=seqs, k=k)


def full_batch(seqs, width):
    """token_logprobs' batch of the full sequences, right-padded to width + 1."""
    toks = np.zeros((len(seqs), width + 1), np.int32)
    seg = np.zeros((len(seqs), width), np.int32)
    for r, s in enumerate(seqs):
        toks[r, : len(s)] = s
        seg[r, : len(s) - 1] = 1
    pos = np.broadcast_to(np.arange(width, dtype=np.int32), seg.shape)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "positions": pos, "segment_ids": seg}


def reference_logprobs(params, case, cfg):
    """[R, C]: token_logprobs on prefix + continuation, read at the continuation's positions."""
    ref = np.asarray(token_logprobs(params, full_batch(case["seqs"], P + C), cfg))
    R = len(case["seqs"])
    starts = np.repeat(case["plen"], case["k"])
    return ref[np.arange(R)[:, None], starts[:, None] + np.arange(C)[None, :]]


def scored(case):
    return (case["mask"] != 0) & (np.arange(C)[None, :] < case["clen"][:, None])


@pytest.fixture(scope="module")
def case():
    return make_case(np.random.default_rng(0), PREFIX_LENS, K, P, C, CFG.vocab_size)


@jax.jit
def _cached(params, tokens, lengths, cont, clen, targets, mask):
    cache = repeat_cache(prefix_cache(params, tokens, lengths, CFG, cache_len=P + C), K)
    return continuation_logprobs(params, cache, cont, clen, targets, mask, CFG, chunk=CHUNK)


def test_cached_scoring_equals_full_sequence_scoring(params, case):
    out = np.asarray(_cached(params, case["left"], case["plen"], case["cont"], case["clen"], case["targets"], case["mask"]))
    ref = reference_logprobs(params, case, CFG)
    sc = scored(case)
    assert sc.sum() > 20 and (~sc).sum() > 5
    np.testing.assert_allclose(out[sc], ref[sc], atol=ATOL, rtol=0)
    assert (out[~sc] == 0).all()
    assert np.abs(ref[sc]).max() > 5.0  # not comparing near-uniform distributions


def test_right_padding_small_cache_and_policy_values_agree(params, case):
    args = (case["cont"], case["clen"], case["targets"], case["mask"])
    out = np.asarray(_cached(params, case["left"], case["plen"], *args))
    right = repeat_cache(prefix_cache(params, case["right"], case["plen"], CFG, cache_len=P + C, right_padded=True), K)
    np.testing.assert_allclose(continuation_logprobs(params, right, *args, CFG, chunk=CHUNK), out, atol=ATOL, rtol=0)
    small = repeat_cache(prefix_cache(params, case["left"], case["plen"], CFG, cache_len=max(P, C)), K)
    np.testing.assert_allclose(continuation_logprobs(params, small, *args, CFG, chunk=4), out, atol=ATOL, rtol=0)
    for exact in (False, True):
        for tokens, rp in ((case["left"], False), (case["right"], True)):
            pol = policy_logprobs(params, tokens, case["plen"], *args, CFG, exact=exact, chunk=CHUNK, right_padded=rp)
            np.testing.assert_allclose(pol, out, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ gradients
def _weights(case):
    return np.random.default_rng(1).normal(size=case["mask"].shape).astype(np.float32)  # advantage-like


def _policy_loss(params, case, exact):
    lp = policy_logprobs(
        params,
        case["left"],
        case["plen"],
        case["cont"],
        case["clen"],
        case["targets"],
        case["mask"],
        CFG,
        exact=exact,
        chunk=CHUNK,
    )
    return (lp * _weights(case)).sum()


def _exact_reference_loss(params, case):
    R = len(case["seqs"])
    ref = token_logprobs(params, full_batch(case["seqs"], P + C), CFG)
    starts = np.repeat(case["plen"], case["k"])
    lp = ref[np.arange(R)[:, None], starts[:, None] + np.arange(C)[None, :]]
    return (lp * scored(case) * _weights(case)).sum()


def _frozen_prefix_reference_loss(params, case):
    """Prefix K/V from stop_gradient(params) (each row's prefix prefilled on its own, no repeat), the
    continuation with params through forward(cache=...) and full [R, C, V] logits, no chunking."""
    k, (R, _) = case["k"], case["cont"].shape
    toks = np.repeat(case["left"], k, axis=0)
    lens = np.repeat(case["plen"], k)
    slot = np.arange(P)[None, :]
    valid = slot >= P - lens[:, None]
    pos = np.where(valid, slot - (P - lens[:, None]), 0)
    cache = KVCache.init(CFG, R, P + C)
    frozen = jax.lax.stop_gradient(params)
    _, cache = forward(frozen, toks, pos, CFG, segment_ids=valid.astype(np.int32), cache=cache, empty_cache=True)
    seg = (np.arange(C)[None, :] < case["clen"][:, None]).astype(np.int32)
    logits, _ = forward(params, case["cont"], lens[:, None] + np.arange(C)[None, :], CFG, segment_ids=seg, cache=cache)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), case["targets"][..., None], -1)[..., 0]
    return (lp * scored(case) * _weights(case)).sum()


def _assert_trees_close(a, b, rtol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        rel = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)
        assert rel < rtol, f"{jax.tree_util.keystr(path)}: relative error {rel:.2e}"
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max(), err_msg=jax.tree_util.keystr(path))


def _rel_diff(a, b):
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return math.sqrt(num / sum(float(jnp.sum(y**2)) for y in jax.tree.leaves(b)))


def test_exact_and_cache_constant_gradients(params, case):
    g = lambda f: jax.jit(jax.grad(lambda p: f(p, case)))(params)  # noqa: E731
    exact, exact_ref = g(lambda p, c: _policy_loss(p, c, True)), g(_exact_reference_loss)
    _assert_trees_close(exact, exact_ref, GRAD_RTOL)
    approx, approx_ref = g(lambda p, c: _policy_loss(p, c, False)), g(_frozen_prefix_reference_loss)
    _assert_trees_close(approx, approx_ref, GRAD_RTOL)
    diff = _rel_diff(approx, exact)
    print(f"cache-constant vs exact gradient: relative difference {diff:.3f}")
    assert diff > 1e-2  # the test can tell the two apart


# ------------------------------------------------------------------------------------------------ memory
WIDE = LlamaConfig(vocab_size=16384, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=128)
WP, WC, WK, WCHUNK = 8, 48, 3, 16  # R = 6, R*C = 288: chunk*V is 1/18 of R*C*V


def _walk_eqns(jaxpr):
    """Every equation of a jaxpr and of its sub-jaxprs (scan / cond / checkpoint / pjit bodies)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _walk_eqns(inner)


def _walk_avals(jaxpr):
    """Every intermediate's aval in a jaxpr and its sub-jaxprs."""
    return (v.aval for eqn in _walk_eqns(jaxpr) for v in eqn.outvars)


def _largest(f, *args):
    return max(math.prod(a.shape) for a in _walk_avals(jax.make_jaxpr(f)(*args).jaxpr) if hasattr(a, "shape"))


@pytest.fixture(scope="module")
def wide():
    params = init_params(WIDE, jax.random.key(1))
    return params, make_case(np.random.default_rng(2), [3, 8], WK, WP, WC, WIDE.vocab_size)


def _wide_scores(params, tokens, lengths, cont, clen, targets, mask):
    cache = repeat_cache(prefix_cache(params, tokens, lengths, WIDE, cache_len=WP + WC), WK)
    return continuation_logprobs(params, cache, cont, clen, targets, mask, WIDE, chunk=WCHUNK)


def _wide_naive(params, batch):
    return token_logprobs(params, batch, WIDE)


def _wide_policy_grad(remat):
    def loss(params, tokens, lengths, cont, clen, targets, mask):
        return policy_logprobs(params, tokens, lengths, cont, clen, targets, mask, WIDE, chunk=WCHUNK, remat=remat).sum()

    return jax.grad(loss)


def test_no_rows_by_vocab_intermediate(wide):
    params, w = wide
    args = (params, w["left"], w["plen"], w["cont"], w["clen"], w["targets"], w["mask"])
    NV = w["cont"].size * WIDE.vocab_size
    naive_args = (params, full_batch(w["seqs"], WP + WC))
    sizes = {
        "scores": _largest(_wide_scores, *args),
        "policy grad (remat)": _largest(_wide_policy_grad(True), *args),
        "policy grad (no remat)": _largest(_wide_policy_grad(False), *args),
        "naive token_logprobs": _largest(_wide_naive, *naive_args),
    }
    temp = {
        "scores": jax.jit(_wide_scores).lower(*args).compile().memory_analysis().temp_size_in_bytes,
        "policy grad (remat)": jax.jit(_wide_policy_grad(True)).lower(*args).compile().memory_analysis().temp_size_in_bytes,
        "naive token_logprobs": jax.jit(_wide_naive).lower(*naive_args).compile().memory_analysis().temp_size_in_bytes,
    }
    print(f"R*C*V = {NV} elements ({NV * 4} bytes); largest intermediates {sizes}; temp bytes {temp}")
    assert sizes["scores"] < NV and sizes["policy grad (remat)"] < NV
    assert sizes["policy grad (no remat)"] >= NV and sizes["naive token_logprobs"] >= NV  # the check can tell
    assert temp["scores"] < NV * 4 and temp["policy grad (remat)"] < NV * 4
    assert temp["naive token_logprobs"] >= NV * 4


def _switch_widths(jaxpr):
    """The number of branches of every cond / switch in a jaxpr and its sub-jaxprs."""
    return (len(eqn.params["branches"]) for eqn in _walk_eqns(jaxpr) if eqn.primitive.name == "cond")


def test_policy_gradient_attends_over_one_length(wide):
    """Scoring (no gradient) picks one of the decode buckets' attended lengths with a lax.switch; the policy's
    gradient does not: under a gradient every branch's residuals would be stacked (zero-filled for the branches
    not taken) in each layer."""
    params, w = wide
    args = (params, w["left"], w["plen"], w["cont"], w["clen"], w["targets"], w["mask"])
    assert WIDE.decode_buckets == 4
    assert max(_switch_widths(jax.make_jaxpr(_wide_scores)(*args).jaxpr)) == 4  # the check can tell
    assert max(_switch_widths(jax.make_jaxpr(_wide_policy_grad(True))(*args).jaxpr), default=0) <= 2  # chunk skips
