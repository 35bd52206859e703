"""`python -m jaxgpt.convert SRC DST ...`: checkpoint conversion between
jaxgpt / torchgpt model directories, .pt, safetensors, Hugging Face and
nanoGPT. The converter is framework-free and lives in
gptcore/formats/convert.py; this entry point is where the README names it.
"""

from __future__ import annotations

import sys

from gptcore.formats import FormatError  # noqa: F401
from gptcore.formats.convert import convert, main, read_pt  # noqa: F401  (the public entry points)

if __name__ == "__main__":
    sys.exit(main())
