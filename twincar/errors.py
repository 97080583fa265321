"""The one base class of errors a user can fix: entry points print their message, not a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


class TwinCarError(Exception):
    """A problem with the user's input (a path, a file, an option); the message says what to do."""


def user_error(error: BaseException) -> TwinCarError | None:
    """The :class:`TwinCarError` behind ``error``: itself, or the one another library wrapped it in (Hydra's
    ``instantiate`` raises its own exception with ours as the cause); None when there is none."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, TwinCarError):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None


@contextmanager
def exit_on_user_error(log: logging.Logger) -> Iterator[None]:
    """The body of a Hydra entry point: a :class:`TwinCarError`, or another library's exception caused by one, is
    logged as one sentence and the process exits with 1, no traceback."""
    try:
        yield
    except Exception as e:
        error = user_error(e)
        if error is None:
            raise
        log.error("%s", error)
        sys.exit(1)


def run_hydra_tool(hydra_main: Callable[[], T], log: logging.Logger,
                   *checks: Callable[[Sequence[str]], None]) -> T:
    """A Hydra tool's command-line entry point: each check of the raw overrides runs first (a removed or renamed
    option is one sentence naming the new one, where Hydra would only say "not in struct"), then the tool's
    ``@hydra.main`` function."""
    with exit_on_user_error(log):
        for check in checks:
            check(sys.argv[1:])
    return hydra_main()
