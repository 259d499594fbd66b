"""The reproduction's three ways to stop: bad input (exit 2), a failed run (exit 1), a signal (--resume)."""


class UsageError(ValueError):
    """Bad input: one line on stderr, exit status 2."""


class RunFailed(RuntimeError):
    """The input was fine but a run failed (non-finite loss, a failed checkpoint write): exit status 1."""


class Stopped(Exception):
    """A signal stopped a stage; the reproduction continues with --resume."""
