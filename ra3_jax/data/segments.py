"""Segmenters for RLPT (next-segment reasoning): sentences for text, statements (or lines) for code.

A document becomes segments whose concatenation is the document (whitespace stays attached), then
(context, target, next) triples: predict ``target`` = s_i from ``context`` = s_<i (ASR), or also given
``next`` = s_{i+1} (MSR). Segments shorter than ``min_chars`` (stripped) are never targets; they stay in the
context. Rule-based, no models.
"""

from __future__ import annotations

import dataclasses
import re

from ra3_jax.data.boundaries import find_boundaries, split_steps

# Abbreviations after which a period does not end a sentence (lower-cased, without the period).
ABBREVIATIONS = {
    "mr",
    "mrs",
    "ms",
    "dr",
    "prof",
    "sr",
    "jr",
    "st",
    "vs",
    "etc",
    "e.g",
    "i.e",
    "cf",
    "fig",
    "no",
    "vol",
    "approx",
    "inc",
    "ltd",
    "co",
    "jan",
    "feb",
    "mar",
    "apr",
    "jun",
    "jul",
    "aug",
    "sep",
    "sept",
    "oct",
    "nov",
    "dec",
    "u.s",
    "a.m",
    "p.m",
}
_END = re.compile(r"""[.!?]+["')\]]*(?=\s)|\n\s*\n""")


def split_sentences(text: str) -> list[str]:
    """Sentences (and paragraph breaks) of ``text``; the pieces concatenate back to ``text``."""
    cuts = [0]
    for m in _END.finditer(text):
        end = m.end()
        if m.group().startswith("\n"):  # paragraph break: cut after it
            cuts.append(end)
            continue
        before = text[cuts[-1] : m.start()].split()
        word = before[-1].lower().rstrip(".") if before else ""
        if word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()):  # "Dr." / initials "J."
            continue
        nxt = text[end:].lstrip()
        if nxt and nxt[0].islower():  # "e.g. the" / "3.5 mm" style continuations
            continue
        while end < len(text) and text[end] in " \t\n":  # trailing whitespace stays with the sentence
            end += 1
        cuts.append(end)
    cuts = sorted(set(c for c in cuts if 0 <= c <= len(text)))
    if cuts[-1] != len(text):
        cuts.append(len(text))
    return [text[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


def split_code(text: str, granularity: str = "statement") -> list[str]:
    """Statements (``data.boundaries``; tolerant of syntax errors) or non-blank lines."""
    return [s for s in split_steps(text, find_boundaries(text, granularity)) if s]


def segment(text: str, kind: str) -> list[str]:
    if kind == "text":
        return split_sentences(text)
    if kind in ("code", "statement"):
        return split_code(text, "statement")
    if kind == "line":
        return split_code(text, "line")
    raise ValueError(f"segmenter {kind!r} is not one of text | code | line")


@dataclasses.dataclass(frozen=True)
class Triple:
    doc: str
    index: int  # i: the target is segment i
    context: str  # s_<i (cut from the left to the last max_context_chars characters)
    target: str  # s_i
    next: str  # s_{i+1} ("" when i is the last segment)
    after: tuple  # s_i, s_{i+1}, ... (a few): what a prediction may be a prefix of


def make_triples(
    text: str,
    doc: str,
    kind: str,
    *,
    min_chars: int = 8,
    max_context_chars: int = 2000,
    lookahead: int = 4,
    require_next: bool = False,
) -> list[Triple]:
    segs = segment(text, kind)
    out = []
    for i in range(1, len(segs)):
        if len(segs[i].strip()) < min_chars:
            continue
        if require_next and i + 1 >= len(segs):
            continue
        ctx = "".join(segs[:i])[-max_context_chars:]
        if not ctx.strip():
            continue
        out.append(Triple(doc, i, ctx, segs[i], segs[i + 1] if i + 1 < len(segs) else "", tuple(segs[i : i + lookahead])))
    return out
