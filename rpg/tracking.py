"""Experiment tracking: W&B when enabled (offline unless the user configured an account), otherwise a no-op.

`wandb` is imported only when logging is switched on, so the package works without it (and tests never touch it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from rpg.config import LoggingConfig


class Tracker:
    """Thin wrapper: `log(metrics, step)` and `finish()`; does nothing when disabled."""

    def __init__(self, run: Any = None):
        self.run = run

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(dict(metrics))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def start_tracking(cfg: LoggingConfig, *, name: str, group: str, config: Mapping[str, Any],
                   directory: str | Path, job_type: str) -> Tracker:
    """Start a W&B run (mode from cfg, `WANDB_MODE` in the environment wins) or return a disabled Tracker."""
    if not cfg.wandb or cfg.wandb_mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return Tracker()
    import wandb  # only imported when logging is on

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=cfg.project, entity=cfg.entity, name=name, group=group, job_type=job_type,
                     config=dict(config), dir=str(directory), mode=os.environ.get("WANDB_MODE", cfg.wandb_mode),
                     reinit="finish_previous")
    return Tracker(run)
