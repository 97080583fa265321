"""The one base class of errors a user can fix: entry points print their message, not a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class TwinCarError(Exception):
    """A problem with the user's input (a path, a file, an option); the message says what to do."""


@contextmanager
def exit_on_user_error(log: logging.Logger) -> Iterator[None]:
    """The body of a Hydra entry point: a :class:`TwinCarError` is logged as one sentence and the process exits
    with 1, no traceback."""
    try:
        yield
    except TwinCarError as e:
        log.error("%s", e)
        sys.exit(1)
