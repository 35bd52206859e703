"""`python -m torchgpt.prepare [--config PRESET] data.corpus=SPEC [data.tokenizer=...] --out DIR`:
a corpus of any size as a token dataset, which both trainers read with
data.tokens=DIR. Parallel text: jaxgpt/prepare.py; the command itself is
gptcore/prepare_cli.py (no framework is involved).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gptcore.prepare_cli import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(argv, "python -m torchgpt.prepare")


if __name__ == "__main__":
    sys.exit(main())
