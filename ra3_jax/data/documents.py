"""RA3 documents: code files cut at step boundaries, and documents with latents inserted (host data).

A document's token sequence is ``[start] + z_1? + a_1 + z_2? + a_2 + ... + [eos]``: each step a_t is tokenized
separately, so inserting a latent never changes the tokens of the code. A latent is a rationale rendered as one
Python comment line (``<indent><marker> <text>``), so a document with latents stays valid Python.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ra3_jax.data.bootstrap import BootstrapRecord
from ra3_jax.data.boundaries import find_boundaries, indentation, split_steps


@dataclasses.dataclass
class Document:
    doc_id: str
    steps: list[list[int]]  # tokens of each step a_t
    texts: list[str]
    indents: list[str]

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def code_tokens(self) -> int:
        return sum(len(s) for s in self.steps)


def make_documents(text: str, source_id: str, tokenizer, r) -> list[Document]:
    """Cut a file at step boundaries into documents of at most ``r.max_doc_tokens`` code tokens."""
    steps = split_steps(text, find_boundaries(text, r.granularity, r.every_k, r.max_depth))
    toks = tokenizer.encode_batch(steps)
    docs, cur, n = [], [], 0

    def flush():
        if cur and any(t for _, t in cur) and any(s.strip() for s, _ in cur):
            docs.append(
                Document(f"{source_id}#{len(docs)}", [t for _, t in cur], [s for s, _ in cur], [indentation(s) for s, _ in cur])
            )

    for s, t in zip(steps, toks):
        if cur and n + len(t) > r.max_doc_tokens:
            flush()
            cur, n = [], 0
        cur.append((s, list(t)))
        n += len(t)
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


def start_id(tokenizer) -> int:
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def doc_sequence(doc: Document, latents: dict, tokenizer, upto: int | None = None):
    """Token sequence of ``doc`` with ``latents`` ({step: {"tokens", "text"}}) inserted.

    Returns (tokens, latent_mask); ``upto`` = stop before step ``upto`` (a prompt prefix; no eos then).
    """
    toks, mask = [start_id(tokenizer)], [0]
    end = doc.num_steps if upto is None else upto
    for t in range(end):
        z = latents.get(t)
        if z is not None:
            toks += z["tokens"]
            mask += [1] * len(z["tokens"])
        toks += doc.steps[t]
        mask += [0] * len(doc.steps[t])
    if upto is None:
        toks.append(tokenizer.eos_id)
        mask.append(0)
    return toks, mask


def doc_text(doc: Document, latents: dict) -> str:
    return "".join((latents[t]["text"] if t in latents else "") + doc.texts[t] for t in range(doc.num_steps))


def render_latent(indent: str, marker: str, body: str) -> str:
    """A rationale as one Python comment line (the document stays valid Python)."""
    body = body.split("\n", 1)[0].replace("\r", "")
    return f"{indent}{marker}{body.rstrip()}\n"


def iteration_docs(all_docs: list[Document], docs_per_iteration: int, k: int) -> list[Document]:
    """The documents EM iteration k annotates: a window of ``docs_per_iteration`` cycling through all of them."""
    if not docs_per_iteration:
        return all_docs
    n = len(all_docs)
    start = (k * docs_per_iteration) % n
    return [all_docs[(start + i) % n] for i in range(min(docs_per_iteration, n))]


def bootstrap_records(docs, latents, tokenizer, k: int, source_step: int) -> list[BootstrapRecord]:
    """The bootstrap corpus of iteration k: every document with its accepted latents."""
    recs = []
    for d, doc in enumerate(docs):
        lat = latents.get(d, {})
        toks, mask = doc_sequence(doc, lat, tokenizer)
        tok_arr, mask_arr = np.asarray(toks, np.int32), np.asarray(mask, np.int8)
        recs.append(BootstrapRecord(tok_arr, mask_arr, doc_text(doc, lat), doc.doc_id, k, source_step, len(lat)))
    return recs
