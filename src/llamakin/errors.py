"""User-facing errors.

Every problem a user can cause (a bad path, a corrupt file, a missing tensor, an invalid knob)
is raised as a :class:`LlamakinError` whose message is one sentence naming the thing and what
to do about it. The CLI prints that sentence and exits with code 2, without a traceback.
"""

from __future__ import annotations


class LlamakinError(Exception):
    """A problem with the user's input, explained in one sentence."""


class ConfigError(LlamakinError, ValueError):
    """An invalid model configuration (a knob out of range, inconsistent sizes, ...)."""


class CheckpointError(LlamakinError):
    """A checkpoint that cannot be read: missing, corrupt, truncated, or with wrong tensors."""


class UnsupportedError(LlamakinError):
    """Something llamakin does not handle (an unknown architecture, a config a family cannot express)."""
