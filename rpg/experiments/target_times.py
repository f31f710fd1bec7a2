"""Wall time of a workflow run target by target: how long the first target takes from empty, then what each further
target adds.

    python -m rpg.experiments.target_times --out results/run.csv results/table11.csv results/table16.csv ... all

runs `snakemake --cores <cores> <target>` once per target, in the order given, in the current folder, and appends one
row per target to `--out` (target, command, commit, started, finished, wall_s, rc) as soon as it finishes, so a crash
or Ctrl-C keeps every row before it. Each command builds only what the targets before it left missing, so a row is
the marginal cost of its target and the rows add up to the whole run. Stops at the first target that fails.
Snakemake's per-job benchmark files (`rpg.experiments.rule_times`) say where the time went inside each row.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from rpg.utils import write_csv_atomic

COLUMNS = ["target", "command", "commit", "started", "finished", "wall_s", "rc"]


def _commit() -> str:
    """The checked-out commit (with `+dirty` when the work tree has changes), or `unknown` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("+dirty" if dirty else "")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_targets(targets: list[str], out: str | Path, cores: str = "all", snakemake_args: list[str] | None = None,
                snakemake: str = "snakemake") -> pd.DataFrame:
    """Run Snakemake once per target, in order, appending one row per target to `out` (rows already there are kept:
    a resumed run adds to them). Returns the table written; stops after the first target whose command fails."""
    if not targets:
        raise ValueError("no targets given")
    out = Path(out)
    table = pd.read_csv(out) if out.exists() else pd.DataFrame(columns=COLUMNS)
    if list(table.columns) != COLUMNS:
        raise ValueError(f"{out} is not a target-times table (columns {list(table.columns)}, expected {COLUMNS})")
    commit = _commit()
    for target in targets:
        command = [snakemake, "--cores", str(cores), target, *(snakemake_args or [])]
        started, t0 = _now(), time.monotonic()
        rc = subprocess.run(command).returncode
        row = {"target": target, "command": shlex.join(command), "commit": commit, "started": started,
               "finished": _now(), "wall_s": round(time.monotonic() - t0, 1), "rc": rc}
        table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
        write_csv_atomic(out, table)
        print(f"[target_times] {target}: {row['wall_s']:.0f} s, exit {rc}", file=sys.stderr, flush=True)
        if rc != 0:
            break
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="CSV the rows are appended to (created when missing)")
    parser.add_argument("--cores", default="all", help="snakemake --cores (default: all)")
    parser.add_argument("--snakemake", default="snakemake", help="the snakemake executable")
    parser.add_argument("--snakemake-args", default="",
                        help='options added to every call, one string after "=" (--snakemake-args="--keep-going")')
    parser.add_argument("targets", nargs="+", help="Snakemake targets (files or rule names), in order")
    args = parser.parse_args(argv)
    table = run_targets(args.targets, args.out, cores=args.cores, snakemake_args=shlex.split(args.snakemake_args),
                        snakemake=args.snakemake)
    return int(table["rc"].iloc[-1])


if __name__ == "__main__":
    sys.exit(main())
