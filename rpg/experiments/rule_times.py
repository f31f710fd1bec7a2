"""Per-rule time and memory of a finished workflow run, from Snakemake's `benchmark:` files.

Every rule writes `results/benchmarks/rules/<experiment>/<rule>[...].tsv` (wall s, CPU s, peak RSS, mean load). This
gathers them into one table, grouped by experiment folder, for the README's per-target time table:

    python -m rpg.experiments.rule_times results/benchmarks/rules [--out rule_times.csv]

Wall seconds add up to the run's wall time only where jobs ran one after another; Snakemake runs independent
one-thread jobs side by side (the Table 1 family), so the group totals also give CPU seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from rpg.utils import write_csv_atomic

COLUMNS = {"s": "wall_s", "cpu_time": "cpu_s", "max_rss": "max_rss_mb", "mean_load": "mean_load"}


def rule_times(bench_dir: str | Path) -> pd.DataFrame:
    """One row per benchmark file: group (its folder under `bench_dir`), job (file name), wall_s, cpu_s,
    max_rss_mb, mean_load. Raises FileNotFoundError when there is none."""
    root = Path(bench_dir)
    files = sorted(root.rglob("*.tsv"))
    if not files:
        raise FileNotFoundError(f"no Snakemake benchmark files (*.tsv) under {root}")
    rows = []
    for path in files:
        tsv = pd.read_csv(path, sep="\t")
        missing = set(COLUMNS) - set(tsv.columns)
        if missing:
            raise ValueError(f"{path} is not a Snakemake benchmark file (lacks {sorted(missing)})")
        last = tsv.iloc[-1]  # a rerun appends nothing: one row per job (repeat: 1)
        rel = path.relative_to(root)
        rows.append({"group": str(rel.parent), "job": rel.stem, **{new: float(last[old]) for old, new in COLUMNS.items()}})
    return pd.DataFrame(rows)


def group_totals(times: pd.DataFrame) -> pd.DataFrame:
    """Per group: jobs, summed wall and CPU seconds, the largest peak RSS."""
    return times.groupby("group").agg(jobs=("job", "size"), wall_s=("wall_s", "sum"), cpu_s=("cpu_s", "sum"),
                                      max_rss_mb=("max_rss_mb", "max")).reset_index()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_dir", help="results/benchmarks/rules of a finished run")
    parser.add_argument("--out", help="also write the per-job table as CSV")
    args = parser.parse_args(argv)
    times = rule_times(args.bench_dir)
    if args.out:
        write_csv_atomic(args.out, times)
    with pd.option_context("display.width", 160, "display.max_rows", 500):
        print(times.round(1).to_string(index=False))
        print()
        print(group_totals(times).round(1).to_string(index=False))


if __name__ == "__main__":
    main()
