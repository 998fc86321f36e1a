"""The one exception type that the CLI turns into a one-line message and exit code 2, and the
handler that does it for every entry point (``slm`` and ``python -m slmkit.train``)."""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable


class SlmError(Exception):
    """A problem with the user's input or files: the message says what and how to fix it.

    The CLI prints ``error: <message>`` on one line and exits with code 2, never a traceback.
    """


def run_command(run: Callable[[], int]) -> int:
    """Run a command and return its exit code, turning what it raises into one line on stderr:
    ``SlmError`` -> ``error: ...`` and 2; Ctrl-C -> ``interrupted`` and 130; a closed stdout
    (``slm generate ... | head``) -> 0; disk full or a refused path -> ``error: ...`` and 2.
    Anything else is a bug and keeps its traceback."""
    try:
        return run()
    except SlmError as e:
        message = str(e).replace("\r", "\\r").replace("\n", "\\n")  # a name with a newline must not break the line
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `slm generate ... | head` closes stdout early: not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        # The machine, not the input: still one line, since what to do about it is clear.
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: disk full while writing {e.filename or 'a file'}: free space and run again", file=sys.stderr)
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            print(f"error: {e.strerror} ({e.filename}): check the path and its permissions", file=sys.stderr)
        else:
            raise
        return 2
