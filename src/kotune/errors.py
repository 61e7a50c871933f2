"""The base of every error a user can fix.

Each module defines and raises its own subclass (``ConfigError`` in ``config``, ``DataError`` in ``data.read``...);
the message names what was wrong, where (file, row, key) and what to do. ``kotune`` prints one
``kotune: error: MESSAGE`` line for any of them, without a traceback, and exits with its ``exit_code``.
"""


class KotuneError(Exception):
    """A problem the user can fix; the message says what, where and what to do."""

    exit_code = 2
    """The process's exit status when the CLI stops on this error."""
    refusal = False
    """Raised from what every process reads alike (the config, the data, the model folder, the run folder), before
    training: under torchrun each process stops on it, and only the first says so (one line, not one per GPU).
    Errors that may differ by process (out of memory, a checkpoint) print on each."""
