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
import socket
import sys
import time

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


def process_layout(args) -> tuple[str, int, int] | None:
    """(coordinator address, number of processes, this process's index) of a
    multi-process run, None for one process; checked before anything else
    (a process count without a coordinator would silently train alone)."""
    address = coordinator(args)
    if not address:
        if args.num_processes is not None or args.process_id is not None:
            raise RunError("--num-processes / --process-id need --coordinator HOST:PORT (or JAXGPT_COORDINATOR)")
        return None
    try:
        num = args.num_processes or int(os.environ.get("JAXGPT_NUM_PROCESSES", "1"))
        pid = args.process_id if args.process_id is not None else int(os.environ.get("JAXGPT_PROCESS_ID", "0"))
    except ValueError as e:
        raise RunError(f"JAXGPT_NUM_PROCESSES / JAXGPT_PROCESS_ID must be integers ({e})") from None
    if num < 1 or not 0 <= pid < num:
        raise RunError(f"process {pid} of {num}: --num-processes must be >= 1 and --process-id in [0, {num})")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RunError(f"--coordinator {address!r}: expected HOST:PORT")
    return address, num, pid


def env_seconds(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, str(default)))
    except ValueError:
        raise RunError(f"{name} must be a whole number of seconds") from None
    if value < 1:
        raise RunError(f"{name} must be >= 1 second")
    return value


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Until the coordinator accepts a TCP connection, or a one-line error
    after `timeout` seconds: XLA's own client aborts the process with a C++
    stack when it cannot connect."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RunError(f"cannot reach the coordinator at {address} within {timeout:.0f} s "
                               f"(JAXGPT_COORDINATOR_TIMEOUT): {e.strerror or e}") from None
            time.sleep(0.5)


def init_distributed(layout: tuple[str, int, int] | None) -> None:
    """Multi-host: jax.distributed.initialize from --coordinator /
    --num-processes / --process-id, or JAXGPT_COORDINATOR / _NUM_PROCESSES /
    _PROCESS_ID. CPU processes talk over gloo. Process 0 hosts the
    coordinator; the others wait for it up to JAXGPT_COORDINATOR_TIMEOUT
    seconds (default 60), the bound on joining as well. A process that stops
    sending heartbeats for JAXGPT_HEARTBEAT_TIMEOUT seconds (default 60)
    fails the others, so a hung or killed peer never leaves a run waiting forever."""
    if layout is None:
        return
    address, num, pid = layout
    timeout = env_seconds("JAXGPT_COORDINATOR_TIMEOUT", 60)
    if pid != 0:
        wait_for_coordinator(address, timeout)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid,
                                   initialization_timeout=timeout,
                                   heartbeat_timeout_seconds=env_seconds("JAXGPT_HEARTBEAT_TIMEOUT", 60))
    except Exception as e:  # XlaRuntimeError and friends: bad process id, ...
        raise RunError(f"cannot join the run at {address} as process {pid} of {num}: "
                       f"{(str(e).splitlines() or [''])[0]}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, "python -m jaxgpt.train")
    if args.print_config:
        return guarded(lambda: print_config(args))

    def body():
        layout = process_layout(args)
        spec = resolve_checked(args.config, args.overrides, args.resume)
        if layout is None:
            split_cpu(spec.train)
        init_distributed(layout)
        run(spec)

    def where() -> str:
        return f"process {jax.process_index()} of {jax.process_count()}: " if jax.process_count() > 1 else ""

    code = guarded(body, where)
    if code and jax.process_count() > 1:
        # Most likely a collective failed because another process died. Exit
        # now: jax's exit handler would wait for the dead process at a barrier.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
