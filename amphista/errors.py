"""Errors raised for bad input. Each message names the problem and the fix."""


class AmphistaError(Exception):
    """Base class of every error this library raises on purpose."""


class InputError(AmphistaError, ValueError):
    """A request the decoder cannot serve: empty prompt, prompt too long, bad settings."""


class BatchingError(InputError):
    """A target or drafter that batched decoding cannot serve; `generate` on one prompt at a time still can."""


class TreeError(AmphistaError, ValueError):
    """An invalid token-tree specification."""


class DrafterMismatchError(AmphistaError, ValueError):
    """A drafter built for another target (vocabulary, hidden size, architecture)."""


class CheckpointError(AmphistaError, OSError):
    """A missing, corrupt or too-new checkpoint on disk."""
