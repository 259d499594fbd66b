"""Bad command-line input, shared by the package's commands (eval, export, the reproduction):
one line `error: ...` on stderr and exit status 2, never argparse's usage block."""
from __future__ import annotations

import argparse
import sys


class UsageError(ValueError):
    """Bad input: one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """Raises UsageError instead of printing usage and exiting (argparse's own status is 2 as well)."""
    def error(self, message):
        raise UsageError(message)


def error_line(e: BaseException) -> str:
    """The one line of a bad-input error: an OSError's file and reason, else the message's first line."""
    if isinstance(e, OSError):
        return f"error: {e.filename or ''}: {e.strerror or e}".replace("error: : ", "error: ")
    return f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def run_cli(call, bad_input: tuple = ()):
    """-> (exit status, call()'s result): a UsageError, an OSError or one of `bad_input` is one line on
    stderr and status 2."""
    try:
        return 0, call()
    except (UsageError, OSError, *bad_input) as e:
        print(error_line(e), file=sys.stderr)
    return 2, None
