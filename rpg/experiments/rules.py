"""Glue for Snakemake `script:` rules: the process's threads, the rule's log, and the validated Config."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from rpg.allocator import keep_freed_memory
from rpg.config import Config, config_from_dict, neutral_values
from rpg.utils import CorruptFileError


def run_rule(smk: Any, job: Callable[[Config], Any], config: Mapping[str, Any] | None = None) -> Any:
    """Run `job(cfg)` with stdout/stderr appended to `smk.log[0]`; re-raise failures after logging them.

    The one place a workflow job sets its torch threads: the rule's `threads` (as Snakemake granted them) and its
    allocator (`rpg.allocator.keep_freed_memory`, unless the config's `keep_freed_memory` is false); and the one
    place a file of results_dir that cannot be read (truncated, corrupt) gets the rule that writes it named.
    config: a validated config dict other than the workflow's (a regime of the study); default `smk.config`.
    """
    torch.set_num_threads(max(1, int(smk.threads)))
    cfg = config_from_dict(smk.config if config is None else config, validated=True)  # validated by common.smk
    keep_freed_memory(cfg.keep_freed_memory)
    log_path = smk.log[0] if len(smk.log) else os.devnull
    with open(log_path, "a", buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            return job(cfg)
        except CorruptFileError as err:
            traceback.print_exc(file=log)
            # the workflow's results_dir: a study regime's jobs read the workflow's files, not their own folder's
            rule = writer_rule(err.path, smk.config["results_dir"], cfg.zoo.mode)
            if rule is None:
                raise
            cause = err.__cause__ or err
            rerun = CorruptFileError(err.path, f"{err.path} is truncated or corrupt ({cause}); rule `{rule}` writes "
                                               f"it: rerun that rule and what depends on it with `snakemake <your "
                                               f"targets and options> --forcerun {rule}` (--forcerun last: it takes "
                                               "every name after it)")
            print(f"{type(rerun).__name__}: {rerun}", file=log)
            raise rerun from err
        except Exception:
            traceback.print_exc(file=log)
            raise


# The rule that writes each file under results_dir (workflow/rules/*.smk), by the leading parts of the file's path
# there ("*": any one part); the first match counts. tests/test_weak_cases.py checks it against `snakemake --summary`.
WRITERS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("backbone",), "backbone"),
    (("features", "domains_*"), "domain_features"),
    (("features",), "features"),
    (("zoo", "*", "split.json"), "split"),
    (("zoo",), "zoo"),  # checkpoints/: `finetune_task` where zoo.mode is finetune
    (("rpg",), "train_rpg"),
    (("generated",), "generate"),
    (("table1", "collections"), "collect_checkpoints"),
    (("table1", "*", "rpg"), "train_arch_rpg"),
    (("table1", "*", "generated"), "generate_arch"),
)


def writer_rule(path: str | Path, results_dir: str | Path, zoo_mode: str = "batched_heads") -> str | None:
    """The workflow rule that writes `path` (a file under the workflow's `results_dir`; zoo checkpoints are
    `finetune_task`'s in `zoo_mode` finetune), or None where it is none of the files WRITERS knows."""
    try:
        parts = Path(os.path.abspath(path)).relative_to(os.path.abspath(results_dir)).parts
    except ValueError:  # not under results_dir
        return None
    for prefix, rule in WRITERS:
        if len(parts) >= len(prefix) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts, prefix)):
            if rule == "zoo" and parts[2:3] == ("checkpoints",) and zoo_mode == "finetune":
                return "finetune_task"
            return rule
    return None


# Keys added after results existed, with the value that reproduces those results (marked in the schema): a rule's
# setting leaves them out while they hold it, so adding a key never reruns a finished DAG (set to anything else,
# they are part of it).
NEUTRAL_DEFAULTS: dict[str, Any] = neutral_values()


def _without_neutral(key: str, value: Any) -> Any:
    """`value` of config key `key` without the sub-keys that hold their neutral default."""
    if not isinstance(value, Mapping):
        return value
    out = {}
    for sub, v in value.items():
        path = f"{key}.{sub}"
        if path in NEUTRAL_DEFAULTS and v == NEUTRAL_DEFAULTS[path]:
            continue
        out[sub] = _without_neutral(path, v)
    return out


def config_setting(config: Mapping[str, Any], *keys: str) -> str:
    """The resolved config values a rule depends on, as canonical JSON for a rule's `params: setting=...`.

    `keys` are top-level keys or dotted paths (``"tasks.n_val"``). Snakemake stores a job's params with its
    outputs and reruns the job (and, through its outputs, everything downstream) when they change;
    ``snakemake --summary`` marks such jobs' outputs "params changed".
    """
    chosen: dict[str, Any] = {}
    for key in keys:
        value: Any = config
        for part in key.split("."):
            if not isinstance(value, Mapping) or part not in value:
                raise KeyError(f"config has no key '{key}'")
            value = value[part]
        if key in NEUTRAL_DEFAULTS and value == NEUTRAL_DEFAULTS[key]:
            continue
        chosen[key] = _without_neutral(key, value)
    return json.dumps(chosen, sort_keys=True, default=str)
