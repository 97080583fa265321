"""The one base class of errors a user can fix: entry points print their message, not a traceback."""


class TwinCarError(Exception):
    """A problem with the user's input (a path, a file, an option); the message says what to do."""
