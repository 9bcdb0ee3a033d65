"""RA3 documents (formulation v2, docs/RA3.md): code files cut at step boundaries, and documents with latents.

A latent at boundary t (before step a_t) is a rationale rendered as one Python comment line
``<indent of a_t><marker><body>\\n``, so a document with latents stays valid Python. ``render(doc, latents)`` is
the document's text with its latents inserted; its token sequence is ``start + encode(render) + [eos]``,
tokenized WHOLE (the canonical tokenization, exactly what the pre-training pipeline feeds and the model reads and
writes at generation time): the M-step trains on it, the E-step scores it and the bound evaluates it. ``start``
is ``[bos]`` when the tokenizer prepends one itself and empty otherwise (``start_ids``): never a token the model
did not see in training.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ra3_jax.data.bootstrap import BootstrapRecord
from ra3_jax.data.boundaries import find_boundaries, indentation, split_steps


@dataclasses.dataclass
class Document:
    doc_id: str
    texts: list[str]  # the steps a_1..a_T (each ends with a newline, except maybe the last)
    indents: list[str]

    @property
    def num_steps(self) -> int:
        return len(self.texts)

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def code_bytes(self) -> int:
        """UTF-8 bytes of the code: the unit of the per-byte bound."""
        return len(self.text.encode("utf-8"))


def make_documents(text: str, source_id: str, tokenizer, r) -> list[Document]:
    """Cut a file at step boundaries into documents of at most ``r.max_doc_tokens`` code tokens (counted step
    by step, an estimate of the whole-document count)."""
    steps = split_steps(text, find_boundaries(text, r.granularity, r.every_k, r.max_depth))
    sizes = [len(t) for t in tokenizer.encode_batch(steps)]
    docs, cur, n = [], [], 0

    def flush():
        if cur and any(s.strip() for s in cur):
            docs.append(Document(f"{source_id}#{len(docs)}", list(cur), [indentation(s) for s in cur]))

    for s, k in zip(steps, sizes):
        if cur and n + k > r.max_doc_tokens:
            flush()
            cur, n = [], 0
        cur.append(s)
        n += k
    flush()
    return docs


def take_documents(source, tokenizer, r, n: int, seed: int) -> list[Document]:
    """The first ``n`` documents (0 = all) of the files of ``source`` in a seeded shuffled order."""
    order = np.random.default_rng(seed).permutation(len(source))
    out: list[Document] = []
    for i in order:
        ex = source[int(i)]
        text = ex["text"].decode("utf-8") if isinstance(ex["text"], bytes) else ex["text"]
        path = ex["path"].decode("utf-8") if isinstance(ex["path"], bytes) else ex["path"]
        out.extend(make_documents(text, path, tokenizer, r))
        if n and len(out) >= n:
            return out[:n]
    return out


def start_ids(tokenizer) -> list[int]:
    """The token(s) a document starts with: ``[bos]`` when the tokenizer prepends a BOS itself (``add_bos``, as the
    pre-training pipeline and the sampler see every text), else none: a start token the model never saw in
    training would shift and disturb everything after it. Without one, a document's first token is context
    only (never scored) and no latent can go before the first step."""
    return [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None else []


def first_boundary(tokenizer) -> int:
    """The first boundary a latent may take: 0 with a start token, else 1 (a latent needs context before it)."""
    return 0 if start_ids(tokenizer) else 1


def render_latent(indent: str, marker: str, body: str) -> str:
    """A rationale as one Python comment line (the document stays valid Python): the body up to its first
    line break, trailing whitespace dropped."""
    body = body.split("\n", 1)[0].replace("\r", "")
    return f"{indent}{marker}{body.rstrip()}\n"


def render(doc: Document, latents: dict, upto: int | None = None) -> str:
    """The text of ``doc`` with ``latents`` ({step: {"text": comment line, ...}}) inserted before their steps;
    ``upto``: only the steps before ``upto`` (a prefix, ending right at boundary ``upto``)."""
    end = doc.num_steps if upto is None else upto
    return "".join((latents[t]["text"] if t in latents else "") + doc.texts[t] for t in range(end))


def encode_text(text: str, tokenizer) -> list[int]:
    """``start_ids + encode(text)``: the canonical tokens of a document prefix (no eos), exactly as the
    pre-training pipeline tokenizes a document."""
    return encode_texts([text], tokenizer)[0]


def doc_sequence(doc: Document, latents: dict, tokenizer) -> tuple[list[int], list[int]]:
    """(tokens, latent_mask) of the whole document with its latents: ``[start] + encode(render) + [eos]``; the
    mask marks tokens that start inside a latent line (for the M-step's ``mask_latents`` ablation)."""
    text = render(doc, latents)
    toks = encode_text(text, tokenizer) + [tokenizer.eos_id]
    lat_spans, pos = [], 0
    for t in range(doc.num_steps):
        if t in latents:
            n = len(latents[t]["text"].encode("utf-8"))
            lat_spans.append((pos, pos + n))
            pos += n
        pos += len(doc.texts[t].encode("utf-8"))
    return toks, latent_token_mask(toks, lat_spans, tokenizer)


def latent_token_mask(toks: list[int], spans: list[tuple[int, int]], tokenizer) -> list[int]:
    """1 for tokens whose first byte lies in one of the byte ``spans`` of the text (start and eos tokens: 0)."""
    if not spans:
        return [0] * len(toks)
    lengths = tokenizer.token_bytes()
    n0 = len(start_ids(tokenizer))
    mask, pos = [0] * n0, 0
    for tok in toks[n0:-1]:
        mask.append(int(any(lo <= pos < hi for lo, hi in spans)))
        pos += int(lengths[tok])
    return mask + [0]


def encode_texts(texts: list[str], tokenizer) -> list[list[int]]:
    """``encode_text`` of many texts in one tokenizer call."""
    start, strip = start_ids(tokenizer), getattr(tokenizer, "add_bos", False)
    out = []
    for ids in tokenizer.encode_batch(list(texts)):
        ids = list(ids)
        out.append(start + (ids[1:] if strip and ids and ids[0] == tokenizer.bos_id else ids))
    return out


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix of token sequences."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


@dataclasses.dataclass
class ScoringRows:
    """Canonical token rows that score one candidate boundary: ``latent[g]`` = start + prefix + z_g + horizon,
    ``cont`` = start + prefix + horizon (each tokenized whole, eos appended when the horizon ends the document).
    Tokens ``[shared:]`` of every row are scored (the rows agree before ``shared``); in latent row g, tokens
    ``[shared:lp_end[g]]`` are the rationale's own (LP: the tokens shared with the tokenization of prefix + z_g)
    and the rest is the horizon (LL)."""

    latent: list[list[int]]
    cont: list[int]
    shared: int
    lp_end: list[int]


def scoring_rows(prefix: str, latent_lines: list[str], horizon: str, tokenizer, *, ends_document: bool) -> ScoringRows:
    eos = [tokenizer.eos_id] if ends_document else []
    G = len(latent_lines)
    texts = [prefix + z + horizon for z in latent_lines] + [prefix + horizon] + [prefix + z for z in latent_lines]
    enc = encode_texts(texts, tokenizer)
    latent, cont, pz = [r + eos for r in enc[:G]], enc[G] + eos, enc[G + 1 :]
    shared = min(common_prefix_len(latent + [cont]), min(len(r) for r in latent + [cont]) - 1)
    lp_end = [max(shared, min(common_prefix_len([pz[g], latent[g]]), len(latent[g]))) for g in range(G)]
    return ScoringRows(latent, cont, shared, lp_end)


def span_mask(length: int, lo: int, hi: int) -> list[int]:
    """A token mask of ``length`` with ones on tokens ``lo .. hi - 1``."""
    return [0] * lo + [1] * (hi - lo) + [0] * (length - hi)


def iteration_docs(all_docs: list[Document], docs_per_iteration: int, k: int) -> list[Document]:
    """The documents EM iteration k annotates: a window of ``docs_per_iteration`` cycling through all of them."""
    if not docs_per_iteration:
        return all_docs
    n = len(all_docs)
    start = (k * docs_per_iteration) % n
    return [all_docs[(start + i) % n] for i in range(min(docs_per_iteration, n))]


def bootstrap_records(docs, latents, tokenizer, k: int, source_step: int) -> list[BootstrapRecord]:
    """The bootstrap corpus of iteration k: every document with its accepted latents, tokenized whole."""
    recs = []
    for d, doc in enumerate(docs):
        lat = latents.get(d, {})
        toks, mask = doc_sequence(doc, lat, tokenizer)
        tok_arr, mask_arr = np.asarray(toks, np.int32), np.asarray(mask, np.int8)
        recs.append(BootstrapRecord(tok_arr, mask_arr, render(doc, lat), doc.doc_id, k, source_step, len(lat)))
    return recs
