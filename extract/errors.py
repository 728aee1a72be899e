"""The one exception family the CLI turns into a clear one-line message instead of a traceback."""


class AHError(Exception):
    """A user-facing error: the message names the file and the problem. `exit_code` is the CLI's status."""

    exit_code = 2
