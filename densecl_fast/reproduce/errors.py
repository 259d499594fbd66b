"""The reproduction's three ways to stop: bad input (exit 2), a failed run (exit 1), a signal (--resume)."""
from ..usage import UsageError  # noqa: F401  (bad input, as every command of the package reports it)


class RunFailed(RuntimeError):
    """The input was fine but a run failed (non-finite loss, a failed checkpoint write): exit status 1."""


class Stopped(Exception):
    """A signal stopped a stage; the reproduction continues with --resume."""
