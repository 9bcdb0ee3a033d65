"""The project's error types, and which errors are the user's to fix.

``RA3Error`` marks an error the user can fix (bad input, config, files), as opposed to a bug: the CLI prints
it in one line and exits 2, and lets every other exception through with its traceback. Each module's own
error class (``ConfigError``, ``CorpusError``, ``SandboxError``, ...) subclasses it and keeps its other base
(``ValueError`` or ``RuntimeError``), so code that catches those still does.
"""

from __future__ import annotations


class RA3Error(Exception):
    """A user-facing error: bad input, config, files; the CLI prints it in one line and exits 2."""


class TrainingError(RA3Error, RuntimeError):
    """A run cannot start or go on as configured (mode, batch and mesh sizes, data, resumed state)."""


class InputError(RA3Error, ValueError):
    """Bad input to a library call: sizes that do not fit (mesh, model shape, prompt length), empty prompts."""
