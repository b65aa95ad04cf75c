"""The one exception type l2sp raises for bad input: a single line saying what is wrong and how to fix it,
and how a command shows it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class L2SPError(ValueError):
    """Bad input to l2sp. The message is one line: what is wrong, then what to do about it.

    The CLI prints it as ``l2sp: error: <message>`` and exits with status 2, without a traceback.
    """


def guarded(command: Callable[[], int | None]) -> int:
    """Run ``command()`` as the ``l2sp`` command does: an :class:`L2SPError` prints ``l2sp: error: <message>``
    (one line, no traceback) and gives status 2, Ctrl-C 130, a closed output pipe 0."""
    try:
        return int(command() or 0)
    except L2SPError as exc:
        print(f"l2sp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("l2sp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
