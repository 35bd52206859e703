"""Training in PyTorch, the reference: `python -m torchgpt.train --config PRESET key=value ... [--resume]`.

Parallel text: jaxgpt/train.py. The run is resolved once (gptcore.run),
trained by the shared loop (gptcore.loop) over torchgpt's engine:

    optim.py              AdamW on nanoGPT's decay mask, lr_at
    step.py               loss, the train step (clip_grad_norm_), evaluation
    train_checkpoints.py  latest.pt / best.pt
    engine.py             the above behind gptcore.loop.Engine
    train.py              this command line

Single process, CPU or one GPU, float32.
"""

from __future__ import annotations

import sys

from gptcore import loop
from gptcore.cli import guarded
from gptcore.run import Run, RunError, parse_args, print_config, resolve_checked
from torchgpt.engine import TorchEngine


def run(run: Run) -> dict:
    """Train as `run` says; the summary of gptcore.loop.train."""
    return loop.train(run, TorchEngine(run))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, "python -m torchgpt.train")
    if args.print_config:
        return guarded(lambda: print_config(args))

    def body():
        if args.coordinator or args.num_processes is not None or args.process_id is not None:
            raise RunError("torchgpt.train is the one-process reference: --coordinator, --num-processes and "
                           "--process-id are jaxgpt.train's")
        run(resolve_checked(args.config, args.overrides, args.resume))

    return guarded(body)


if __name__ == "__main__":
    sys.exit(main())
