"""In-graph sampler against independent references: a naive re-forward greedy loop, teacher-forced
logprobs, numpy top-k/top-p sets, and a plain byte search for stop strings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ra3_jax.model import LlamaConfig, forward, init_params
from ra3_jax.objectives.ntp import token_logprobs
from ra3_jax.sampler import STOP_EOS, STOP_LENGTH, STOP_STRING, Greedy, Sampler, Temperature, build_stop_automata, sampling_method

CFG = LlamaConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=512)
LOGPROB_ATOL = 1e-4  # sampler (KV cache, incremental) vs trainer (one teacher-forced pass), float32


@pytest.fixture(scope="module")
def params():
    # scale up the random weights so the model has peaked, position-dependent distributions
    p = init_params(CFG, jax.random.key(0))
    return jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, p)


@pytest.fixture(scope="module")
def sampler(params, spm_tokenizer):
    return Sampler(CFG, spm_tokenizer, eos_ids=[])


def naive_greedy(params, cfg, prompt, n, width=64):
    """Reference: re-run the full forward on the whole sequence for every new token (no cache). The sequence
    is right-padded to a fixed width (pads masked out, causal attention) so the reference compiles once."""
    fwd = jax.jit(forward, static_argnums=3)
    seq = list(prompt)
    for _ in range(n):
        L = len(seq)
        toks = np.zeros((1, width), np.int32)
        toks[0, :L] = seq
        seg = (np.arange(width) < L).astype(np.int32)[None]
        logits, _ = fwd(params, toks, np.arange(width)[None], cfg, segment_ids=seg)
        seq.append(int(jnp.argmax(logits[0, L - 1])))
    return seq[len(prompt) :]


PROMPTS = [[5, 17, 99, 3, 250, 8, 41], [300], [12, 12, 13, 200, 201, 202, 7, 7, 9, 1, 2, 3, 4, 5, 6, 7, 8, 11, 400]]


def test_greedy_equals_naive_loop_and_is_padding_invariant(sampler, params):
    out = sampler.generate_tokens(params, PROMPTS, max_new_tokens=12, sampling=Greedy())
    for i, p in enumerate(PROMPTS):
        ref = naive_greedy(params, CFG, p, 12)
        assert out.tokens[i].tolist() == ref, f"prompt {i}"
        alone = sampler.generate_tokens(params, [p], max_new_tokens=12, sampling=Greedy())
        assert alone.tokens[0].tolist() == ref  # same alone as inside a padded batch
    assert (out.lengths == 12).all() and (out.stop_reason == STOP_LENGTH).all()
    # prompts padded to a multiple of 24 slots (not a power of two) give the same greedy tokens
    odd = Sampler(CFG, sampler.tokenizer, prompt_multiple=24).generate_tokens(
        params, PROMPTS, max_new_tokens=12, sampling=Greedy()
    )
    for i, p in enumerate(PROMPTS):
        assert odd.tokens[i].tolist() == naive_greedy(params, CFG, p, 12), f"prompt {i}, prompt_multiple"


def test_right_padded_input_is_equivalent(params, spm_tokenizer):
    from ra3_jax.sampler import generate, token_byte_table

    tb, tl = token_byte_table(spm_tokenizer, CFG.vocab_size)
    dfa, acc = build_stop_automata([])
    P = 32
    lens = np.array([len(p) for p in PROMPTS], np.int32)
    left = np.zeros((3, P), np.int32)
    right = np.zeros((3, P), np.int32)
    for i, p in enumerate(PROMPTS):
        left[i, P - len(p) :] = p
        right[i, : len(p)] = p
    f = np.zeros((3, 1), np.int32)
    kw = dict(cfg=CFG, sampling=Greedy(), max_new_tokens=8)
    a = generate(params, left, lens, jax.random.key(0), f, np.zeros(3, np.int32), dfa, acc, tb, tl, **kw)
    b = generate(params, right, lens, jax.random.key(0), f, np.zeros(3, np.int32), dfa, acc, tb, tl, right_padded=True, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_max_steps_stops_the_loop_inside_the_bucket(params, spm_tokenizer):
    """max_steps (traced) ends decoding early in a wider buffer: the same sampled tokens and log-probs as the full
    run up to the limit, nothing written after it (the loop really stopped), lengths = the limit."""
    from ra3_jax.sampler import generate, token_byte_table

    tb, tl = token_byte_table(spm_tokenizer, CFG.vocab_size)
    dfa, acc = build_stop_automata([])
    lens = np.array([len(p) for p in PROMPTS], np.int32)
    toks = np.zeros((3, 32), np.int32)
    for i, p in enumerate(PROMPTS):
        toks[i, 32 - len(p) :] = p
    args = (params, toks, lens, jax.random.key(3), np.zeros((3, 1), np.int32), np.zeros(3, np.int32), dfa, acc, tb, tl)
    kw = dict(cfg=CFG, sampling=Temperature(temperature=1.0), max_new_tokens=16, num_samples=2, pad_id=0)
    full = generate(*args, **kw)
    cut = generate(*args, **kw, max_steps=np.int32(5))
    np.testing.assert_array_equal(np.asarray(cut.tokens[:, :5]), np.asarray(full.tokens[:, :5]))
    np.testing.assert_allclose(np.asarray(cut.logprobs[:, :5]), np.asarray(full.logprobs[:, :5]), atol=1e-6)
    assert (np.asarray(cut.tokens[:, 5:]) == 0).all() and (np.asarray(cut.logprobs[:, 5:]) == 0).all()
    assert (np.asarray(full.tokens[:, 5:]) != 0).any()  # the full run did write past the limit
    assert (np.asarray(cut.lengths) == 5).all() and (np.asarray(cut.stop_reason) == STOP_LENGTH).all()


def test_logprobs_equal_teacher_forced_trainer_logprobs(sampler, params):
    sp = Temperature(temperature=0.7, top_k=50)
    out = sampler.generate_tokens(params, PROMPTS, max_new_tokens=10, sampling=sp, key=jax.random.key(1))
    for i, p in enumerate(PROMPTS):
        seq = np.array(p + out.tokens[i].tolist(), np.int32)
        batch = {
            "inputs": seq[None, :-1],
            "targets": seq[None, 1:],
            "positions": np.arange(len(seq) - 1)[None],
            "segment_ids": np.ones((1, len(seq) - 1), np.int32),
        }
        tf = np.asarray(token_logprobs(params, batch, CFG))[0, len(p) - 1 :]
        np.testing.assert_allclose(out.logprobs[i], tf, atol=LOGPROB_ATOL)
        # processed logprobs: the same logits through temperature and top-k (reference in numpy)
        logits, _ = forward(params, jnp.array(seq[None, :-1]), jnp.arange(len(seq) - 1)[None], CFG)
        lg = np.asarray(logits[0, len(p) - 1 :], np.float64) / sp.temperature
        kth = np.sort(lg, -1)[:, -sp.top_k][:, None]
        lg = np.where(lg < kth, -np.inf, lg)
        ref = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
        np.testing.assert_allclose(out.logprobs_processed[i], ref[np.arange(10), out.tokens[i]], atol=LOGPROB_ATOL)


def test_top_k_top_p_only_emit_allowed_tokens():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 512)) * 3, jnp.float32)
    for sp in (
        Temperature(temperature=1.0, top_k=7),
        Temperature(temperature=0.8, top_p=0.5),
        Temperature(temperature=1.3, top_k=20, top_p=0.9),
    ):
        x = np.asarray(logits, np.float64) / sp.temperature
        allowed = np.ones_like(x, bool)
        if sp.top_k:
            allowed &= x >= np.sort(x, -1)[:, -sp.top_k][:, None]
        if sp.top_p < 1:
            xm = np.where(allowed, x, -np.inf)
            order = np.argsort(-xm, -1)
            pr = np.exp(xm - xm.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            ps = np.take_along_axis(pr, order, -1)
            keep_sorted = (np.cumsum(ps, -1) - ps) < sp.top_p
            keep = np.zeros_like(allowed)
            np.put_along_axis(keep, order, keep_sorted, -1)
            allowed &= keep
        keys = jax.random.split(jax.random.key(3), 400)
        toks = np.asarray(jax.vmap(lambda k, sp=sp: sp.sample(logits, k)[0])(keys))  # [400, 4]
        for r in range(4):
            assert allowed[r, toks[:, r]].all()
            assert len(set(toks[:, r])) > 1 or allowed[r].sum() == 1  # it samples, not argmax
    top1 = Temperature(temperature=1.0, top_k=1).sample(logits, jax.random.key(0))[0]
    np.testing.assert_array_equal(top1, jnp.argmax(logits, -1))  # top-k 1 is greedy


def test_sampling_is_deterministic_for_a_key(sampler, params):
    sp = Temperature(temperature=1.0)
    a = sampler.generate_tokens(params, PROMPTS, max_new_tokens=8, sampling=sp, key=jax.random.key(5))
    b = sampler.generate_tokens(params, PROMPTS, max_new_tokens=8, sampling=sp, key=jax.random.key(5))
    c = sampler.generate_tokens(params, PROMPTS, max_new_tokens=8, sampling=sp, key=jax.random.key(6))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_stop_strings_stop_where_a_byte_search_says(sampler, params, spm_tokenizer):
    sp = Temperature(temperature=1.0)
    key = jax.random.key(11)
    free = sampler.generate_tokens(params, PROMPTS * 4, max_new_tokens=40, sampling=sp, key=key)
    table = spm_tokenizer.token_byte_strings()
    stops = ["e", "\n", "s ", "(x"]
    stopped = sampler.generate_tokens(params, PROMPTS * 4, max_new_tokens=40, sampling=sp, key=key, stop_strings=stops)
    n_hits = 0
    for r in range(len(PROMPTS) * 4):
        toks = free.tokens[r].tolist()
        ends = np.cumsum([len(table[t]) for t in toks])
        data = b"".join(table[t] for t in toks)
        hits = [data.find(s.encode()) + len(s.encode()) for s in stops if s.encode() in data]
        if hits:
            n_hits += 1
            expect_len = int(np.searchsorted(ends, min(hits)) + 1)  # the token that completes the first match
            assert stopped.stop_reason[r] == STOP_STRING and stopped.lengths[r] == expect_len
            assert stopped.tokens[r, :expect_len].tolist() == toks[:expect_len]
        else:
            assert stopped.stop_reason[r] == STOP_LENGTH and stopped.lengths[r] == 40
    assert n_hits >= 3


def test_eos_forced_prefix_and_group_sharing(params, spm_tokenizer):
    greedy = Greedy()
    plain = Sampler(CFG, spm_tokenizer, eos_ids=[])
    ref = plain.generate_tokens(params, PROMPTS, max_new_tokens=10, sampling=greedy)
    # G samples per prompt share one prefill: greedy rows are identical copies of the single-sample result
    g = plain.generate_tokens(params, PROMPTS, max_new_tokens=10, sampling=greedy, num_samples=3)
    for i in range(len(PROMPTS)):
        for j in range(3):
            np.testing.assert_array_equal(g.tokens[3 * i + j], ref.tokens[i])
    # EOS: make the 4th greedy token of prompt 0 the EOS id -> stops there, the EOS token counted
    eos = int(ref.tokens[0, 3])
    with_eos = Sampler(CFG, spm_tokenizer, eos_ids=[eos]).generate_tokens(params, PROMPTS[:1], max_new_tokens=10, sampling=greedy)
    first = ref.tokens[0].tolist().index(eos)
    assert with_eos.stop_reason[0] == STOP_EOS and with_eos.lengths[0] == first + 1
    # forced prefix: emitted first (with its model logprob), then generation continues from it
    forced = [[7, 8, 9], [], [100]]
    out = plain.generate_tokens(params, PROMPTS, max_new_tokens=10, sampling=greedy, forced_prefix=forced)
    for i, (p, f) in enumerate(zip(PROMPTS, forced)):
        assert out.tokens[i, : len(f)].tolist() == f
        assert out.tokens[i].tolist() == f + naive_greedy(params, CFG, p + f, 10 - len(f))


def test_one_sampler_serves_any_params(sampler, params, spm_tokenizer):
    """Stateless: the same Sampler called with two param trees (same shapes, so the same compiled program) gives
    each tree its own output, equal to a fresh Sampler's; nothing of the first call's weights sticks."""
    other = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, init_params(CFG, jax.random.key(7)))
    kw = dict(max_new_tokens=10, sampling=Temperature(temperature=0.8, top_k=40), key=jax.random.key(3))
    a1 = sampler.generate_tokens(params, PROMPTS, **kw)
    b1 = sampler.generate_tokens(other, PROMPTS, **kw)
    a2 = sampler.generate_tokens(params, PROMPTS, **kw)
    b_fresh = Sampler(CFG, spm_tokenizer, eos_ids=[]).generate_tokens(other, PROMPTS, **kw)
    a_fresh = Sampler(CFG, spm_tokenizer, eos_ids=[]).generate_tokens(params, PROMPTS, **kw)
    assert not np.array_equal(a1.tokens, b1.tokens)  # the two trees really differ
    for x, y in ((a1, a_fresh), (a2, a_fresh), (b1, b_fresh)):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.logprobs, y.logprobs)
    c_other = sampler.complete(other, ["def f(x):\n"], max_new_tokens=8, sampling=Greedy())
    c_fresh = Sampler(CFG, spm_tokenizer, eos_ids=[]).complete(other, ["def f(x):\n"], max_new_tokens=8, sampling=Greedy())
    assert c_other[0].tokens == c_fresh[0].tokens and c_other[0].text == c_fresh[0].text


def test_sampling_method_factory():
    assert sampling_method(0.0) == Greedy() and sampling_method(0, top_k=5, top_p=0.5) == Greedy()
    t = sampling_method(0.7, top_k=5, top_p=0.9)
    assert t == Temperature(0.7, 5, 0.9) and not t.greedy and Greedy().greedy
    assert len({Greedy(), Greedy(), t, Temperature(0.7, 5, 0.9)}) == 2  # hashable: static jit arguments
    with pytest.raises(ValueError):
        Temperature(0.0)


def test_sharded_sampling_matches_single_device(params, spm_tokenizer):
    from ra3_jax import sharding
    from ra3_jax.model.params import shard_params

    greedy = Greedy()
    ref = Sampler(CFG, spm_tokenizer, eos_ids=[]).generate_tokens(
        params, PROMPTS + PROMPTS[:1], max_new_tokens=8, sampling=greedy
    )
    mesh = sharding.make_mesh(2, 2, 2)
    sharded = shard_params(jax.device_get(params), CFG, mesh)
    out = Sampler(CFG, spm_tokenizer, eos_ids=[]).generate_tokens(
        sharded, PROMPTS + PROMPTS[:1], max_new_tokens=8, sampling=greedy
    )
    np.testing.assert_array_equal(out.tokens, ref.tokens)


def test_smollm2_greedy_equals_naive_loop(smollm2_path):
    from ra3_jax.model.convert import load_gguf
    from ra3_jax.tokenizer import HFTokenizer

    cfg, p = load_gguf(smollm2_path)
    tok = HFTokenizer.from_gguf(smollm2_path)
    prompts = ["def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main("]
    s = Sampler(cfg, tok)
    out = s.generate_tokens(p, [tok.encode(x) for x in prompts], max_new_tokens=8, sampling=Greedy())
    for i, x in enumerate(prompts):
        assert out.tokens[i].tolist() == naive_greedy(p, cfg, tok.encode(x), 8)
    c = s.complete(p, ["def add(a, b):\n"], max_new_tokens=32, sampling=Greedy(), stop_strings=["\n\n"])
    text = c[0].text
    assert c[0].stop_reason == "stop_string" and text.endswith("\n\n") and "\n\n" not in text[:-2]
    assert tok.decode(c[0].tokens).startswith(text)


def test_bucketing_avoids_recompiles(sampler, params):
    from ra3_jax.sampler import generate

    sp = Greedy()
    sampler.generate_tokens(params, [[1, 2, 3, 4, 5]], max_new_tokens=10, sampling=sp)
    before = generate._cache_size()
    for prompt, n in (([1, 2, 3, 4, 5, 6, 7, 8, 9], 12), ([9] * 15, 16), ([4, 2], 9)):
        out = sampler.generate_tokens(params, [prompt], max_new_tokens=n, sampling=sp)
        assert out.tokens.shape == (1, n)
    assert generate._cache_size() == before  # prompt bucket 16, new-token bucket 16: one program


def test_sample_cli_streams_jsonl(spm_tokenizer, tfds_dir):
    import json
    import os
    import subprocess
    import sys

    from .conftest import CACHE, REPO

    prompts = "\n".join(json.dumps({"prompt": p}) for p in ["def f(x):\n", "import os\n", "class A:\n"])
    env = dict(os.environ, RA3_JAX_CACHE=os.path.join(CACHE, "jax_cache"), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "ra3_jax.cli",
            "sample",
            "--config",
            f"{REPO}/configs/tiny_cpu.yaml",
            f"tokenizer.path={os.path.join(CACHE, 'spm512')}",
            "--max-new-tokens",
            "12",
            "--num-samples",
            "2",
            "--batch-size",
            "2",
        ],
        input=prompts,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 0, 1, 1, 2, 2]
    # the CLI's random init (key 0) + greedy equals the in-process sampler on the same weights
    cfg = LlamaConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=512)
    ref = Sampler(cfg, spm_tokenizer).complete(
        init_params(cfg, jax.random.key(0)), ["def f(x):\n", "import os\n", "class A:\n"], max_new_tokens=12, sampling=Greedy()
    )
    for r in rows:
        assert r["tokens"] == ref[r["index"]].tokens and r["text"] == ref[r["index"]].text
        assert len(r["logprobs"]) == len(r["tokens"]) and r["stop_reason"] in ("length", "eos")


def test_padded_model_vocab_never_samples_undecodable_ids(spm_tokenizer):
    """A model whose vocabulary is padded past the tokenizer's (here 512 + 256 rows, the padding rows made the
    most likely) samples only ids the tokenizer can decode; logprobs stay the model's full-vocabulary ones."""
    cfg = LlamaConfig(
        vocab_size=768, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128, tie_embeddings=False
    )
    p = init_params(cfg, jax.random.key(3))
    w = np.array(p["lm_head"])  # [D, V]; padding columns = 20x copies of real ones: they dominate every argmax
    w[:, 512:] = 20.0 * w[:, :256]
    p["lm_head"] = jnp.asarray(w)
    s = Sampler(cfg, spm_tokenizer, eos_ids=[])
    assert s.valid_vocab == spm_tokenizer.vocab_size == 512
    for sp in (Greedy(), Temperature(temperature=1.5)):
        out = s.generate_tokens(p, [[5, 6, 7]] * 4, max_new_tokens=16, sampling=sp, key=jax.random.key(1))
        assert int(np.max(out.tokens)) < 512
    comps = s.complete(p, ["def f():"], max_new_tokens=8, sampling=Temperature(temperature=1.0), key=jax.random.key(2))
    assert isinstance(comps[0].text, str)
    # unmasked, this model would pick padding ids: the test is not vacuous
    raw = generate_unmasked_argmax(p, cfg)
    assert raw >= 512


def generate_unmasked_argmax(p, cfg):
    logits, _ = forward(p, np.array([[5, 6, 7]], np.int32), np.arange(3)[None], cfg)
    return int(jnp.argmax(logits[0, -1]))
