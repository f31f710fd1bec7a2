"""Glue for Snakemake `script:` rules: the process's threads, the rule's log, and the validated Config."""

from __future__ import annotations

import contextlib
import json
import os
import traceback
from typing import Any, Callable, Mapping

import torch

from rpg.config import Config, config_from_dict


def run_rule(smk: Any, job: Callable[[Config], Any]) -> Any:
    """Run `job(cfg)` with stdout/stderr appended to `smk.log[0]`; re-raise failures after logging them.

    The one place a workflow job sets its torch threads: the rule's `threads` (as Snakemake granted them).
    """
    torch.set_num_threads(max(1, int(smk.threads)))
    cfg = config_from_dict(smk.config, validated=True)  # common.smk validated and completed it
    log_path = smk.log[0] if len(smk.log) else os.devnull
    with open(log_path, "a", buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            return job(cfg)
        except Exception:
            traceback.print_exc(file=log)
            raise


def config_setting(config: Mapping[str, Any], *keys: str) -> str:
    """The resolved config values a rule depends on, as canonical JSON for a rule's `params: setting=...`.

    `keys` are top-level keys or dotted paths (``"tasks.n_val"``). Snakemake stores a job's params with its
    outputs and reruns the job (and, through its outputs, everything downstream) when they change; it lists such
    jobs with ``snakemake --list-changes params``.
    """
    chosen: dict[str, Any] = {}
    for key in keys:
        value: Any = config
        for part in key.split("."):
            if not isinstance(value, Mapping) or part not in value:
                raise KeyError(f"config has no key '{key}'")
            value = value[part]
        chosen[key] = value
    return json.dumps(chosen, sort_keys=True, default=str)
