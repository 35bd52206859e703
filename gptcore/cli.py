"""What every command line of the project shares: an argument parser whose
errors are one line, and the error boundary around a command's body.

    python -m jaxgpt.train / torchgpt.train     gptcore.run.parse_args
    python -m jaxgpt.generate / torchgpt.generate  gptcore.generation.run_cli
    python -m jaxgpt.convert                     gptcore.formats.convert.main
"""

from __future__ import annotations

import argparse
import sys
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


def guarded(body: Callable[[], object]) -> int:
    """Run a command's body: 0 when it returns, 2 with one line on stderr
    for bad input (UserError) or a file the system refused (OSError), the
    stop's own status and line when a run was stopped by a signal, 130 for
    a Ctrl-C anywhere else."""
    try:
        body()
    except (UserError, OSError) as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(e, file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
