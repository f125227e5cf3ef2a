"""Errors shown to users. The message must name the file/option and say what to do."""


class TintError(Exception):
    """A user-facing error; the CLI prints it without a traceback and exits with 2."""
