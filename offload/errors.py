"""Errors a user can act on.

Every `OffloadError` message is one line that says what is wrong and what to do about it; the CLI
prints it without a traceback. Anything else that escapes is a bug in offload.
"""


class OffloadError(Exception):
    """A problem with the user's input, files or machine, explained in one line."""


class ConfigError(OffloadError):
    """config.json is missing, unreadable, or describes a model offload cannot run."""


class CheckpointError(OffloadError):
    """A safetensors checkpoint is missing a file or tensor, or holds one of the wrong shape."""


def interrupted(error: BaseException) -> bool:
    """Whether `error` is Ctrl-C: a KeyboardInterrupt, or the SystemError Python raises in its stead
    when the signal lands while a compiled kernel is returning ("... returned a result with an
    exception set", caused by the KeyboardInterrupt)."""
    return isinstance(error, KeyboardInterrupt) or (
        isinstance(error, SystemError) and isinstance(error.__cause__ or error.__context__, KeyboardInterrupt))
