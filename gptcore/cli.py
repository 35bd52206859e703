"""What every command line of the project shares: an argument parser whose
errors are one line, and the error boundary around a command's body.

    python -m jaxgpt.train / torchgpt.train     gptcore.run.parse_args
    python -m jaxgpt.generate / torchgpt.generate  gptcore.generation.run_cli
    python -m jaxgpt.convert                     gptcore.formats.convert.main
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable

from gptcore.errors import Stopped, UserError


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: ... (see --help)`, exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def error_line(e: BaseException) -> str:
    """The one line a user sees for a UserError or an OSError."""
    if isinstance(e, OSError) and not isinstance(e, UserError):
        return f"{e.strerror or e}: {e.filename or ''}".rstrip(": ") if e.strerror else str(e)
    return str(e)


def guarded(body: Callable[[], object], where: Callable[[], str] = lambda: "") -> int:
    """Run a command's body, the one error boundary of every command line:
    0 when it returns; 2 with one line on stderr for bad input (UserError), a
    file the system refused (OSError) or memory the machine does not have;
    the stop's own status and line when a run was stopped by a signal; 130
    for a Ctrl-C anywhere else; 1 with one line naming the exception and
    where it was raised for anything else (a bug: JAXGPT_DEBUG=1 shows its
    traceback). `where()` prefixes each line (e.g. "process 1 of 2: ")."""
    try:
        body()
    except (UserError, OSError) as e:
        print(f"error: {where()}{error_line(e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"error: {where()}out of memory (choose a smaller model, batch or input)", file=sys.stderr)
        return 2
    except Stopped as e:
        print(e, file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("JAXGPT_DEBUG"):
            raise
        print(f"error: {where()}{internal_error_line(e)}", file=sys.stderr)
        return 1
    return 0


def internal_error_line(e: BaseException) -> str:
    """An unexpected exception in one line: its type, first message line and
    the innermost frame of ours (or the innermost at all) that raised it."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if any(f"{os.sep}{pkg}{os.sep}" in f.filename for pkg in ("gptcore", "jaxgpt",
                                                                                          "torchgpt"))]
    frame = (ours or frames or [None])[-1]
    at = f" at {os.path.basename(frame.filename)}:{frame.lineno}" if frame else ""
    message = (str(e).strip().splitlines() or [""])[0][:300]
    return (f"internal error {type(e).__name__}{at}: {message} (a bug, or an input we do not check yet; "
            f"JAXGPT_DEBUG=1 shows the traceback)")
