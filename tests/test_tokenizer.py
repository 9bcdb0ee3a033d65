import pytest

from ra3_jax.tokenizer import SentencePieceTokenizer, TokenizerError, load_from_dir, train_sentencepiece

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
