"""Named, exactly invertible tensor transforms: the one vocabulary of weight
mapping, used by the Flax <-> torch rules (gptcore.weights) and by every
foreign format's key map (gptcore.formats.keymap).

A transform takes and returns a list of arrays (a rule may fuse several
tensors into one or split one into several) and may read the model config
(the q / k / v split sizes). `forward` goes from our torch-style names to the
other side, `inverse` back; chained transforms invert in reverse order.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np


class Transform(NamedTuple):
    """A named tensor transform and its exact inverse; both take and return lists of arrays."""
    name: str
    forward: Callable[[list, object], list]  # ours -> theirs
    inverse: Callable[[list, object], list]  # theirs -> ours


def chain(*transforms: Transform) -> Transform:
    """Apply `transforms` in order (ours -> theirs); the inverse runs them backwards."""
    def forward(xs, cfg):
        for t in transforms:
            xs = t.forward(xs, cfg)
        return xs

    def inverse(xs, cfg):
        for t in reversed(transforms):
            xs = t.inverse(xs, cfg)
        return xs

    return Transform("+".join(t.name for t in transforms), forward, inverse)


def invert(t: Transform, name: str) -> Transform:
    return Transform(name, t.inverse, t.forward)


def _transpose(xs, cfg):
    return [np.ascontiguousarray(np.swapaxes(x, -1, -2)) for x in xs]


IDENTITY = Transform("identity", lambda xs, cfg: xs, lambda xs, cfg: xs)
# torch Linear (out, in) <-> Flax Dense kernel / GPT-2 Conv1D (in, out)
TRANSPOSE = Transform("transpose", _transpose, _transpose)
