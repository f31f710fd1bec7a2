"""Glue for Snakemake `script:` rules: send output to the rule's log and build the validated Config."""

from __future__ import annotations

import contextlib
import os
import traceback
from typing import Any, Callable

from rpg.config import Config, config_from_dict


def run_rule(smk: Any, job: Callable[[Config], Any]) -> Any:
    """Run `job(cfg)` with stdout/stderr appended to `smk.log[0]`; re-raise failures after logging them."""
    cfg = config_from_dict(smk.config)
    log_path = smk.log[0] if len(smk.log) else os.devnull
    with open(log_path, "a", buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            return job(cfg)
        except Exception:
            traceback.print_exc(file=log)
            raise
