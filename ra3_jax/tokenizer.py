"""Tokenizers behind one small interface: sentencepiece (train + load) and GGUF / HF byte-level BPE."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterable
from typing import Protocol

from ra3_jax.errors import RA3Error


class TokenizerError(RA3Error, ValueError):
    pass


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int  # end of document / generation
    end_ids: tuple[int, ...]  # every end-of-document / end-of-turn id: the sampler stops on any
    chat_template: str | None  # Jinja chat template (instruct models), see apply_chat_template
    pad_id: int
    add_bos: bool

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def save(self, directory: str) -> str: ...
    def token_bytes(self): ...
    def token_byte_strings(self) -> list[bytes]: ...


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level BPE's byte -> printable character map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# End-of-document and end-of-turn tokens of the common chat formats (ChatML, Llama 2/3, Phi-3, Gemma).
END_TOKENS = (
    "<|endoftext|>",
    "</s>",
    "<eos>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
)


def apply_chat_template(tokenizer: Tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """The conversation as the tokenizer's chat template writes it (ra3_jax.model.chat_template renders it)."""
    from ra3_jax.model.chat_template import render_chat

    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError("the tokenizer has no chat template (a GGUF's tokenizer.chat_template or tokenizer_config.json's)")
    specials = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id}
    names = {k: tokenizer.decode([i]) for k, i in specials.items() if i is not None}
    return render_chat(tokenizer.chat_template, messages, add_generation_prompt=add_generation_prompt, **names)


def _byte_counts(strings: list[bytes]):
    """UTF-8 bytes each token stands for (bits-per-byte accounting; specials count 0)."""
    import numpy as np

    return np.array([len(b) for b in strings], np.int64)


# --------------------------------------------------------------------------------------------- HF / GGUF BPE
class HFTokenizer:
    """A `tokenizers` (Rust) tokenizer: loaded from tokenizer.json or built from a GGUF file's vocab + merges."""

    FILE = "tokenizer.json"
    META = "tokenizer_meta.json"

    def __init__(self, tk, *, bos_id=None, eos_id=None, pad_id=None, add_bos=False, end_ids=(), chat_template=None):
        """``end_ids``: end ids the model's files declare (GGUF / HF eos ids), on top of :data:`END_TOKENS`'s."""
        self._tk = tk
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        # End of document: prefer the pre-training separator over a chat end-of-turn token.
        doc_end = next((tk.token_to_id(t) for t in ("<|endoftext|>", "</s>", "<eos>") if tk.token_to_id(t) is not None), None)
        self.eos_id = eos_id if eos_id is not None else doc_end
        if self.eos_id is None:
            raise TokenizerError("tokenizer has no end-of-document token; set one in tokenizer_meta.json (eos_id)")
        self.pad_id = pad_id if pad_id is not None else self.eos_id
        self.add_bos = bool(add_bos and bos_id is not None)
        specials = {t.content for t in tk.get_added_tokens_decoder().values() if t.special}
        named = [tk.token_to_id(t) for t in END_TOKENS if t in specials]
        ids = [self.eos_id, *end_ids, *named]
        self.end_ids = tuple(dict.fromkeys(int(i) for i in ids if i is not None and 0 <= int(i) < self.vocab_size))
        self.chat_template = chat_template or None

    @classmethod
    def from_file(cls, path: str) -> HFTokenizer:
        from tokenizers import Tokenizer as TK

        path = os.path.expanduser(path)
        file = os.path.join(path, cls.FILE) if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise TokenizerError(f"tokenizer file not found: {file}")
        try:
            tk = TK.from_file(file)
        except Exception as e:
            raise TokenizerError(f"cannot load tokenizer {file}: {e}") from None
        meta_file = os.path.join(os.path.dirname(file), cls.META)
        if os.path.exists(meta_file):
            with open(meta_file, encoding="utf-8") as f:
                return cls(tk, **json.load(f))
        return cls(tk, **_hf_dir_meta(tk, os.path.dirname(file)))

    @classmethod
    def from_gguf(cls, path: str) -> HFTokenizer:
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as TK

        from ra3_jax.model.convert import _field, _gguf_reader

        reader = _gguf_reader(path)
        kind = _field(reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' only)")
        tokens = list(_field(reader, "tokenizer.ggml.tokens"))
        merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
        types = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
        pre = _field(reader, "tokenizer.ggml.pre", "default")
        tk = TK(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre == "smollm":
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in ("default", "gpt2"):
            tk.pre_tokenizer = byte_level
        elif pre in ("qwen2", "llama-bpe", "llama3"):
            pat = (
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            )
            if pre != "qwen2":
                pat = pat.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
            tk.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(pat), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        else:
            raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt2, qwen2, llama-bpe)")
        tk.decoder = decoders.ByteLevel()
        from tokenizers import AddedToken

        special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
        tk.add_special_tokens(special)
        bos = _field(reader, "tokenizer.ggml.bos_token_id")
        declared = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        return cls(
            tk,
            bos_id=None if bos is None else int(bos),
            add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
            end_ids=[int(i) for i in declared if i is not None],
            chat_template=_field(reader, "tokenizer.chat_template"),
        )

    def encode(self, text: str) -> list[int]:
        ids = self._tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if self.add_bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        out = [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]
        return [[self.bos_id] + ids for ids in out] if self.add_bos else out

    def decode(self, ids: Iterable[int]) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str):
        return self._tk.token_to_id(token)

    def token_byte_strings(self) -> list[bytes]:
        """The bytes each token id stands for (specials: b'')."""
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        specials = {t.content for t in self._tk.get_added_tokens_decoder().values() if t.special}
        out = [b""] * self.vocab_size
        for tok, i in self._tk.get_vocab(with_added_tokens=True).items():
            if i < self.vocab_size and tok not in specials:
                out[i] = bytes(byte_of[c] for c in tok) if all(c in byte_of for c in tok) else tok.encode("utf-8")
        return out

    def token_bytes(self):
        return _byte_counts(self.token_byte_strings())

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        self._tk.save(os.path.join(directory, self.FILE))
        with open(os.path.join(directory, self.META), "w", encoding="utf-8") as f:
            meta = dict(bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id, add_bos=self.add_bos)
            json.dump(dict(meta, end_ids=list(self.end_ids), chat_template=self.chat_template), f)
        return directory


def _hf_dir_meta(tk, directory: str) -> dict:
    """An HF model folder's chat template and declared eos ids (tokenizer_config.json, chat_template.jinja,
    generation_config.json), for a tokenizer.json without our tokenizer_meta.json."""

    def read(name):
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read() if name.endswith(".jinja") else json.load(f)

    conf, gen = read("tokenizer_config.json") or {}, read("generation_config.json") or {}
    template = read("chat_template.jinja") or conf.get("chat_template")
    if isinstance(template, list):  # named templates: [{name, template}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    eos = conf.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    declared = gen.get("eos_token_id")
    declared = declared if isinstance(declared, list) else [declared]
    return dict(end_ids=[i for i in [*declared, eos and tk.token_to_id(eos)] if isinstance(i, int)], chat_template=template)


# ---------------------------------------------------------------------------------------------- sentencepiece
class SentencePieceTokenizer:
    FILE = "spm.model"

    def __init__(self, model_file: str):
        import sentencepiece as spm

        model_file = os.path.expanduser(model_file)
        if os.path.isdir(model_file):
            model_file = os.path.join(model_file, self.FILE)
        if not os.path.exists(model_file):
            raise TokenizerError(f"sentencepiece model not found: {model_file}")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_file)
        except Exception as e:
            raise TokenizerError(f"cannot load sentencepiece model {model_file}: {e}") from None
        self._file = model_file
        self.vocab_size = self._sp.GetPieceSize()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self.add_bos = False
        self.end_ids = (self.eos_id,)
        self.chat_template = None

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.EncodeAsIds(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def token_bytes(self):
        return _byte_counts(self.token_byte_strings())

    def token_byte_strings(self) -> list[bytes]:
        sp = self._sp
        out = []
        for i in range(self.vocab_size):
            if sp.IsByte(i):
                out.append(bytes([int(sp.IdToPiece(i)[3:5], 16)]))
            elif sp.IsControl(i) or sp.IsUnknown(i):
                out.append(b"")
            else:
                out.append(sp.IdToPiece(i).replace("\u2581", " ").encode("utf-8"))
        return out

    def token_to_id(self, token: str):
        i = self._sp.PieceToId(token)
        return None if i == self._sp.unk_id() and token != self._sp.IdToPiece(i) else i

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        dst = os.path.join(directory, self.FILE)
        if os.path.abspath(dst) != os.path.abspath(self._file):
            shutil.copyfile(self._file, dst)
        return directory


def _training_lines(texts: Iterable[str]):
    """The texts' non-blank lines (sentencepiece's unit); an empty corpus is an error."""
    n = 0
    for t in texts:
        for line in t.split("\n"):
            if line.strip():
                n += 1
                yield line
    if n == 0:
        raise TokenizerError("cannot train a tokenizer on an empty corpus")


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str,
    *,
    model_type: str = "bpe",
    max_sentence_length: int = 1 << 16,
    input_sentence_size: int = 0,
    seed: int = 0,
    num_threads: int | None = None,
) -> SentencePieceTokenizer:
    """Train a code-friendly sentencepiece model (identity normalization, whitespace kept, byte fallback).

    Each text is split into lines (sentencepiece's unit); newline and tab are user symbols so every text
    round-trips exactly, non-ASCII characters included.
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            byte_fallback=True,
            user_defined_symbols=["\n", "\t"],
            max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            hard_vocab_limit=False,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
            train_extremely_large_corpus=False,
        )
    except RuntimeError as e:
        raise TokenizerError(f"sentencepiece training failed: {e}") from None
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, SentencePieceTokenizer.FILE)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return SentencePieceTokenizer(path)


def load_tokenizer(kind: str, path: str) -> Tokenizer:
    from ra3_jax.model.convert import resolve_model_path

    path = resolve_model_path(path) if kind == "gguf" else os.path.expanduser(path)
    if kind == "gguf":
        return HFTokenizer.from_gguf(path)
    if kind == "hf":
        return HFTokenizer.from_file(path)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    raise TokenizerError(f"unknown tokenizer kind {kind!r}")


def load_from_dir(directory: str) -> Tokenizer:
    """Load whichever tokenizer a checkpoint directory holds."""
    if os.path.exists(os.path.join(directory, HFTokenizer.FILE)):
        return HFTokenizer.from_file(directory)
    if os.path.exists(os.path.join(directory, SentencePieceTokenizer.FILE)):
        return SentencePieceTokenizer(directory)
    raise TokenizerError(f"no tokenizer ({HFTokenizer.FILE} or {SentencePieceTokenizer.FILE}) in {directory}")
