"""Forced completion prefixes (``ra3 eval --mode / --forced-prefix``) and the thought lines they are about.

Every completion of a task starts with a fixed text: the model is prompted with ``prompt + prefix`` and the program
checked is the base format's program of ``prefix + completion`` (for HumanEval-style tasks: prompt + prefix +
completion). The CHAINS modes: ``free`` (no prefix), ``forced`` (the body opens with a thought comment) and
``banned`` (the body opens with the answer's expression, leaving no room for a thought).
"""

from __future__ import annotations

import dataclasses

from ra3_jax.data.chains import FORCED_PREFIXES  # noqa: F401  (CHAINS.md's modes: one definition, in the data)
from ra3_jax.data.chains import MARKER as THOUGHT_MARKER  # a line whose stripped text starts with this is a thought
from ra3_jax.errors import InputError
from ra3_jax.execution import Job


def thought_line(text: str) -> str | None:
    """The body of the first line of ``text`` whose stripped text starts with ``# thought:``, or None."""
    for line in text.splitlines():
        if line.strip().startswith(THOUGHT_MARKER):
            return line.strip()[len(THOUGHT_MARKER) :].strip()
    return None


def has_thought(text: str) -> bool:
    """Whether a line of ``text``, stripped, starts with ``# thought:``."""
    return thought_line(text) is not None


@dataclasses.dataclass(frozen=True)
class ForcedFormat:
    """``base`` (PromptFormat, TaskFormat, ChatFormat) with every completion starting with ``forced_prefix``;
    ``mode`` names it (a key of ``FORCED_PREFIXES``) for the reports."""

    base: object
    forced_prefix: str
    mode: str = "free"

    @property
    def benchmark(self) -> str:
        return self.base.benchmark

    @property
    def stops(self) -> tuple:
        return self.base.stops

    def prompt(self, task: dict) -> str:
        return self.base.prompt(task) + self.forced_prefix

    def program(self, task: dict, completion: str) -> Job:
        return self.base.program(task, self.forced_prefix + completion)


def forced_format(fmt, mode: str = "free", forced_prefix: str | None = None):
    """``fmt`` under ``mode``'s prefix (``forced_prefix``, when given, replaces it); ``fmt`` itself in free mode."""
    if mode not in FORCED_PREFIXES:
        raise InputError(f"unknown mode {mode!r}; choose one of {', '.join(FORCED_PREFIXES)}")
    prefix = FORCED_PREFIXES[mode] if forced_prefix is None else forced_prefix
    return ForcedFormat(fmt, prefix, mode) if prefix or mode != "free" else fmt
