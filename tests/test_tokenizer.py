import sys

import pytest

from ra3_jax.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    apply_chat_template,
    load_from_dir,
    train_sentencepiece,
)

CODE = 'def f(x):\n\t"""Grüße — ½ ✓ 日本"""\n    return x ** 2  # ünïcödé\n\n\nprint(f(3))\n'


def test_sentencepiece_round_trips_code_and_non_ascii(spm_tokenizer, tmp_path):
    ids = spm_tokenizer.encode(CODE)
    assert spm_tokenizer.decode(ids) == CODE
    assert len(ids) < len(CODE.encode())  # it actually merges
    tb = spm_tokenizer.token_bytes()
    assert int(tb[ids].sum()) == len(CODE.encode("utf-8"))
    spm_tokenizer.save(str(tmp_path))
    again = load_from_dir(str(tmp_path))
    assert isinstance(again, SentencePieceTokenizer) and again.encode(CODE) == ids


def test_sentencepiece_batch_and_specials(spm_tokenizer):
    assert spm_tokenizer.encode_batch([CODE, "x = 1"]) == [spm_tokenizer.encode(CODE), spm_tokenizer.encode("x = 1")]
    assert spm_tokenizer.vocab_size == 512 and spm_tokenizer.eos_id == 3 and spm_tokenizer.pad_id == 0


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="empty corpus"):
        train_sentencepiece(["", "   "], 100, str(tmp_path / "t"))
    with pytest.raises(TokenizerError, match="not found"):
        SentencePieceTokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "spm.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="cannot load"):
        SentencePieceTokenizer(str(bad))


# ------------------------------------------------------------------------------------- chat templates, end ids
# SmolLM2-135M-Instruct's template (the GGUF's tokenizer.chat_template): ChatML with a default system turn.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [
    {"role": "user", "content": "Write f."},
    {"role": "assistant", "content": "def f(): pass"},
    {"role": "user", "content": "Thanks"},
]
CHAT_EXPECTED = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWrite f.<|im_end|>\n<|im_start|>assistant\ndef f(): pass<|im_end|>\n"
    "<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n"
)
# Whitespace control, trim/lstrip_blocks, elif/else, set, comments, filters and methods: the subset's corners.
LAYOUT = """{%- for m in messages %}
    {%- if m.role == 'system' -%}
<<SYS>>{{ m.content | trim }}<</SYS>>
    {% elif m['role'] == "user" %}
  [INST] {{ m.content.strip() }} [/INST]
    {%- else %}
{{ m.content }}{{ eos_token }}
    {%- endif %}
{%- endfor %}
{# a comment #}
  {% if add_generation_prompt and not false %}{% set x = 'A:' %}{{ x }}{% endif %}{{ tools }}|
"""


def test_chatml_template_renders_the_hand_written_prompt(monkeypatch):
    from ra3_jax.model.chat_template import render_chat, render_subset

    assert render_subset(CHATML, CHAT) == CHAT_EXPECTED
    with_system = [{"role": "system", "content": "Be brief."}, *CHAT[:1]]
    assert render_subset(CHATML, with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWrite f.<|im_end|>\n"
    )
    pytest.importorskip("jinja2")
    assert render_chat(CHATML, CHAT) == CHAT_EXPECTED  # jinja2's sandbox
    monkeypatch.setitem(sys.modules, "jinja2", None)  # jinja2 missing: the subset renders
    assert render_chat(CHATML, CHAT) == CHAT_EXPECTED


def test_subset_renderer_agrees_with_jinja2_and_rejects_the_rest():
    jinja2 = pytest.importorskip("jinja2")
    from ra3_jax.model.chat_template import ChatTemplateError, render_chat, render_subset

    convs = [CHAT, [{"role": "system", "content": "  sys  "}, *CHAT]]
    for template in (CHATML, LAYOUT):
        for conv in convs:
            for gen in (True, False):
                ours = render_subset(template, conv, add_generation_prompt=gen, eos_token="</s>")
                assert ours == render_chat(template, conv, add_generation_prompt=gen, eos_token="</s>"), (template, conv, gen)
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # an independent check of one rendering
    assert render_subset(LAYOUT, convs[1], eos_token="</s>") == env.from_string(LAYOUT).render(
        messages=convs[1], eos_token="</s>", add_generation_prompt=True
    )
    expected = "<<SYS>>sys<</SYS>>\n  [INST] Write f. [/INST]def f(): pass</s>  [INST] Thanks [/INST]A:|"
    assert render_subset(LAYOUT, convs[1], eos_token="</s>") == expected
    for bad in (
        "{% macro f() %}x{% endmacro %}",
        "{{ messages | length }}",
        "{% if x is defined %}a{% endif %}",
        "{% for m in messages %}",
    ):
        with pytest.raises(ChatTemplateError, match="chat template"):
            render_subset(bad, CHAT)


def test_chat_template_matches_transformers_apply_chat_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = byte_level_tokenizer({0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"})
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok._tk, eos_token="<|im_end|>")
    hf.chat_template = CHATML
    for gen in (True, False):
        ours = apply_chat_template(HFTokenizer(tok._tk, chat_template=CHATML), CHAT, add_generation_prompt=gen)
        assert ours == hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
    with pytest.raises(TokenizerError, match="no chat template"):
        apply_chat_template(tok, CHAT)


def byte_level_tokenizer(specials: dict[int, str], vocab_size: int = 512, **kw) -> HFTokenizer:
    """A byte-level BPE tokenizer like a GGUF's: ``specials`` at the given ids, the 256 byte symbols at the first
    free ids, two-symbol fillers after them."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as TK

    from ra3_jax.tokenizer import _bytes_to_unicode

    symbols = list(_bytes_to_unicode().values())
    plain = iter(symbols + [a + b for a in symbols[:64] for b in symbols[:64]])
    vocab = {specials[i] if i in specials else next(plain): i for i in range(vocab_size)}
    tk = TK(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    return HFTokenizer(tk, **kw)


def write_gguf_vocab(path, tokens, types, **ids):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t", "h e"])
    w.add_chat_template(CHATML)
    for name, i in ids.items():
        getattr(w, f"add_{name}_token_id")(i)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_end_ids_and_chat_template_of_a_gguf_vocab(tmp_path):
    from ra3_jax.tokenizer import _bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<repo_name>", "<|stop|>"]
    tokens = specials + list(_bytes_to_unicode().values()) + ["Ġt", "he", "<|end|>"]  # <|end|>: a normal token
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    write_gguf_vocab(tmp_path / "v.gguf", tokens, types, bos=1, eos=2, eot=5)
    tok = HFTokenizer.from_gguf(str(tmp_path / "v.gguf"))
    # document end first; then the declared eos/eot ids (2, 5), then the named end-of-turn specials (<|eot_id|>)
    assert tok.eos_id == 0 and tok.end_ids == (0, 2, 5, 3)
    assert tok.chat_template == CHATML and apply_chat_template(tok, CHAT) == CHAT_EXPECTED
    tok.save(str(tmp_path / "run"))  # a run dir / model dir keeps both
    again = load_from_dir(str(tmp_path / "run"))
    assert again.end_ids == tok.end_ids and again.chat_template == CHATML and again.eos_id == 0


def test_hf_folder_chat_template_and_eos_ids(tmp_path):
    import json

    tok = byte_level_tokenizer({0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>", 7: "<|my_eot|>"})
    tok._tk.save(str(tmp_path / "tokenizer.json"))  # an HF folder: no tokenizer_meta.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": {"content": "<|my_eot|>"}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 0]}))
    hf = HFTokenizer.from_file(str(tmp_path))
    assert hf.chat_template == CHATML and hf.end_ids == (0, 9, 7, 2)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # the newer HF layout wins
    assert apply_chat_template(HFTokenizer.from_file(str(tmp_path)), CHAT) == "Write f."
    plain = byte_level_tokenizer({0: "<|endoftext|>"})
    assert plain.end_ids == (0,) and plain.chat_template is None


def test_sampler_stops_on_im_end_by_default(spm_tokenizer):
    """The random model of test_sampler: its greedy tokens from a prompt; a tokenizer whose <|im_end|> is the 4th
    of them (and <|endoftext|> none of them) stops there without being told any eos id."""
    import jax
    import numpy as np

    from ra3_jax.model import LlamaConfig, init_params
    from ra3_jax.sampler import STOP_EOS, Greedy, Sampler

    cfg = LlamaConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=512)
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, init_params(cfg, jax.random.key(0)))
    prompt = [[5, 17, 99, 3, 250, 8, 41]]
    ref = Sampler(cfg, spm_tokenizer, eos_ids=[]).generate_tokens(params, prompt, max_new_tokens=12, sampling=Greedy())
    seq = ref.tokens[0].tolist()
    k = next(i for i in range(2, 12) if seq[i] not in seq[:i])
    doc_end = next(i for i in range(512) if i not in seq)
    tok = byte_level_tokenizer({doc_end: "<|endoftext|>", seq[k]: "<|im_end|>"})
    sampler = Sampler(cfg, tok)
    assert sampler.eos_ids == tok.end_ids == (doc_end, seq[k])
    out = sampler.generate_tokens(params, prompt, max_new_tokens=12, sampling=Greedy())
    assert out.stop_reason[0] == STOP_EOS and out.lengths[0] == k + 1
    np.testing.assert_array_equal(out.tokens[0, : k + 1], seq[: k + 1])
    assert (
        Sampler(cfg, tok, eos_ids=[doc_end]).generate_tokens(params, prompt, max_new_tokens=12, sampling=Greedy()).lengths[0]
        == 12
    )
