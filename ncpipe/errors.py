"""The base of errors a user can act on.

The CLI prints such an error's message (never a traceback) and exits with status 2;
any other exception is a bug and keeps its traceback.
"""


class NcpipeError(Exception):
    """Bad input, configuration or environment, explained in the message."""
