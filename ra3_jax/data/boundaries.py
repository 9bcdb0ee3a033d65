"""Step boundaries of Python code: where RA3 may insert a latent rationale.

A document is cut into steps a_1..a_T at boundaries, each a character offset at the start of a line:
- ``statement`` (default): lines that begin a new logical statement (found with the stdlib ``tokenize``
  module: continuation lines of a bracketed expression or a multi-line string are never boundaries; blank and
  comment-only lines are not boundaries either, they belong to the step before them), optionally only at
  indentation depth <= ``max_depth`` (depth counted in INDENT tokens);
- ``line``: every non-blank line.
``every_k`` keeps every k-th boundary. Offsets always include 0 (the document start opens step 1).

Robust to syntax errors: ``tokenize`` stops at the first error (unterminated string, bad dedent, ...); the
statement starts found before it are kept and the rest of the file falls back to the ``line`` rule, restricted
to lines outside an open bracket by a simple bracket count.
"""

from __future__ import annotations

import io
import tokenize

GRANULARITIES = ("statement", "line")


def _line_starts(text: str) -> list[int]:
    starts, pos = [], 0
    for line in text.splitlines(keepends=True):
        starts.append(pos)
        pos += len(line)
    return starts


def _line_rule(text: str, starts: list[int], first_line: int) -> list[int]:
    """Non-blank lines from ``first_line`` (0-based) on, outside open brackets (heuristic fallback)."""
    out, depth = [], 0
    lines = text.splitlines(keepends=True)
    for i in range(first_line, len(lines)):
        line = lines[i]
        if line.strip() and depth <= 0:
            out.append(starts[i])
        code = line.split("#", 1)[0]
        depth += sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")
        depth = max(depth, 0)
    return out


def _statement_lines(text: str, max_depth: int) -> tuple[list[int], int | None]:
    """0-based line numbers of statement starts, and the 0-based line where tokenize failed (or None)."""
    lines: list[int] = []
    depth = 0
    new_statement = True
    skip = (tokenize.NL, tokenize.COMMENT, tokenize.ENCODING)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.INDENT:
                depth += 1
                continue
            if tok.type == tokenize.DEDENT:
                depth -= 1
                continue
            if tok.type in skip:
                continue
            if tok.type == tokenize.NEWLINE:
                new_statement = True
                continue
            if tok.type == tokenize.ENDMARKER:
                break
            if new_statement:
                new_statement = False
                if max_depth < 0 or depth <= max_depth:
                    lines.append(tok.start[0] - 1)
            if tok.type == tokenize.OP and tok.string == ";":
                pass  # `a; b` stays one step: boundaries are line starts
        return lines, None
    except (tokenize.TokenError, IndentationError, SyntaxError) as e:
        lineno = getattr(e, "lineno", None)
        if lineno is None and isinstance(e, tokenize.TokenError) and len(e.args) > 1:
            lineno = e.args[1][0]
        # keep what was found strictly before the failing statement
        fail = (lineno or 1) - 1
        if lines and new_statement is False:
            fail = min(fail, lines[-1])
            lines = lines[:-1]
        return [ln for ln in lines if ln < fail], fail


def find_boundaries(text: str, granularity: str = "statement", every_k: int = 1, max_depth: int = -1) -> list[int]:
    """Sorted character offsets of step starts (always starting with 0)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"boundary granularity {granularity!r} is not one of {GRANULARITIES}")
    if every_k < 1:
        raise ValueError("every_k must be >= 1")
    if not text:
        return [0]
    starts = _line_starts(text)
    if granularity == "line":
        offs = [starts[i] for i, ln in enumerate(text.splitlines(keepends=True)) if ln.strip()]
    else:
        lines, fail = _statement_lines(text, max_depth)
        offs = [starts[i] for i in lines if i < len(starts)]
        if fail is not None and fail < len(starts):
            offs += _line_rule(text, starts, fail)
    offs = sorted(set(offs))[::every_k]
    if not offs or offs[0] != 0:
        offs = [0] + offs
    return offs


def split_steps(text: str, boundaries: list[int]) -> list[str]:
    """The steps a_1..a_T (their concatenation is ``text``)."""
    ends = boundaries[1:] + [len(text)]
    return [text[b:e] for b, e in zip(boundaries, ends)]


def indentation(step: str) -> str:
    """Leading whitespace of a step's first non-blank line (a latent inserted before it uses the same)."""
    for line in step.splitlines():
        if line.strip():
            return line[: len(line) - len(line.lstrip(" \t"))]
    return ""
