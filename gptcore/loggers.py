"""Where a run's metrics go besides metrics.jsonl: TensorBoard event files
(train.tensorboard, written by tensorboardX) and Weights & Biases
(train.wandb_project; offline with WANDB_MODE=offline). Both off by
default; only the lead process logs. A record is metrics.jsonl's: a "step"
and named floats, or lists of floats (expert_load: one scalar per entry).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from gptcore.errors import RunError
from gptcore.train_config import TrainConfig

TENSORBOARD_DIR = "tensorboard"
PACKAGES = {"tensorboard": "tensorboardX", "wandb_project": "wandb"}


def check_loggers(tc: TrainConfig) -> None:
    """Before anything is written: every logger asked for can be imported."""
    for field, package in PACKAGES.items():
        if getattr(tc, field) and importlib.util.find_spec(package) is None:
            raise RunError(f"train.{field} needs the {package} package (pip install {package}), or drop the setting")


def scalars(record: dict) -> dict[str, float]:
    """A record's values as named scalars (the step left out): a list gives NAME/0, NAME/1, ..."""
    out = {}
    for name, value in record.items():
        if name == "step":
            continue
        if isinstance(value, list):
            out |= {f"{name}/{i}": float(v) for i, v in enumerate(value)}
        else:
            out[name] = float(value)
    return out


class Loggers:
    """The extra loggers of a run, fed every metrics record."""

    def __init__(self, tc: TrainConfig, out_dir: Path, config: dict, resume: bool, enabled: bool = True):
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        if tc.tensorboard:
            from tensorboardX import SummaryWriter
            self.tensorboard = SummaryWriter(str(out_dir / TENSORBOARD_DIR))
        if tc.wandb_project:
            import wandb
            self.wandb = wandb.init(project=tc.wandb_project, dir=str(out_dir), config=config,
                                    name=out_dir.name, resume="allow" if resume else None)

    def write(self, record: dict) -> None:
        values = scalars(record)
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, record["step"])
            self.tensorboard.flush()  # a killed run keeps what it logged
        if self.wandb is not None:
            self.wandb.log(values, step=record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
