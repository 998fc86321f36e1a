"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class SlmError(Exception):
    """A problem with the user's input or files: the message says what and how to fix it.

    The CLI prints ``error: <message>`` on one line and exits with code 2, never a traceback.
    """
