"""Training in JAX: `python -m jaxgpt.train --config PRESET key=value ... [--resume]`.

Parallel text: torchgpt/train.py. The run is resolved once (gptcore.run),
trained by the shared loop (gptcore.loop) over jaxgpt's engine:

    optim.py              clipping, AdamW on nanoGPT's decay mask, lr_at
    step.py               TrainState, loss, the train step, evaluation
    runners.py            one device, pmap, or a (data, fsdp) mesh
    train_checkpoints.py  orbax checkpoints of the train state
    engine.py             the above behind gptcore.loop.Engine
    train.py              this command line: device setup, multi-host init
"""

from __future__ import annotations

import os
import sys

import jax

from gptcore import loop
from gptcore.cli import guarded
from gptcore.run import Run, RunError, parse_args, print_config, resolve_checked
from jaxgpt.engine import JaxEngine
from jaxgpt.runners import split_cpu


def run(run: Run) -> dict:
    """Train as `run` says; the summary of gptcore.loop.train."""
    return loop.train(run, JaxEngine(run))


def coordinator(args) -> str | None:
    """The coordinator address of a multi-process run, if this is one."""
    return args.coordinator or os.environ.get("JAXGPT_COORDINATOR")


def init_distributed(args) -> None:
    """Multi-host: jax.distributed.initialize from --coordinator /
    --num-processes / --process-id, or JAXGPT_COORDINATOR / _NUM_PROCESSES /
    _PROCESS_ID. CPU processes talk over gloo. A process that stops sending
    heartbeats for JAXGPT_HEARTBEAT_TIMEOUT seconds (default 60) fails the
    others, so a hung or killed peer never leaves a run waiting forever."""
    address = coordinator(args)
    if not address:
        return
    num = args.num_processes or int(os.environ.get("JAXGPT_NUM_PROCESSES", "1"))
    pid = args.process_id if args.process_id is not None else int(os.environ.get("JAXGPT_PROCESS_ID", "0"))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid,
                                   heartbeat_timeout_seconds=int(os.environ.get("JAXGPT_HEARTBEAT_TIMEOUT", "60")))
    except Exception as e:  # XlaRuntimeError and friends: unreachable coordinator, bad process id, ...
        raise RunError(f"cannot join the run at {address} as process {pid} of {num}: "
                       f"{(str(e).splitlines() or [''])[0]}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, "python -m jaxgpt.train")
    if args.print_config:
        return guarded(lambda: print_config(args))

    def body():
        spec = resolve_checked(args.config, args.overrides, args.resume)
        if not coordinator(args):
            split_cpu(spec.train)
        init_distributed(args)
        run(spec)

    try:
        return guarded(body)
    except Exception as e:
        if jax.process_count() == 1:
            raise
        # Most likely a collective failed because another process died. Exit
        # now: jax's exit handler would wait for the dead process at a barrier.
        print(f"error: process {jax.process_index()} of {jax.process_count()}: {type(e).__name__}: "
              f"{(str(e).splitlines() or [''])[0]}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
