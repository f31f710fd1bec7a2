"""The C allocator's share of each stage: glibc's default malloc vs `rpg.allocator.keep_freed_memory`, side by side.

Every stage of the roofline benchmark (`bench_roofline.stages`: backbone training, feature extraction, the zoo, RPG
training, generation, test-set scoring) runs in child processes, one per allocator setting, alternating
(`system`, `keep_freed`, then `keep_freed`, `system`, ... for `--rounds` rounds), because malloc's settings are
per process and must be made before the work allocates. Per stage and setting: the median wall seconds over the
rounds, and per timed run the minor page faults and the kernel (system) CPU seconds of the process, from
`getrusage`; the child's peak resident memory. `ratio` = system wall / keep_freed wall (above 1: keeping freed
memory is faster); the outputs of the stages are the same arithmetic on the same values in both settings.

    OMP_NUM_THREADS=2 flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_allocator.py   # a few minutes
Writes results/benchmarks/allocator.csv (+ .json, + lscpu.txt); `rpg docs update allocator results/benchmarks/`.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import ROOT, peak_rss_mb, set_threads, write_lscpu, write_results  # noqa: E402

SETTINGS = ("system", "keep_freed")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, nargs="+", default=[ROOT / "config" / "config.yaml"],
                   help="the profile measured (later files override earlier ones)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, OMP_NUM_THREADS)")
    p.add_argument("--rounds", type=int, default=2, help="child processes per setting (alternating order)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per stage in a child, after one warm-up")
    p.add_argument("--stage-args", nargs=argparse.REMAINDER, default=[],
                   help="options of bench_roofline.py's stages (e.g. --backbone-steps 1 --table1 cnn_s); last")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "allocator.csv")
    p.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_child(args: argparse.Namespace) -> list[dict]:
    """Time every stage in this process under one allocator setting; one dict per stage."""
    if args.child == "keep_freed":
        from rpg.allocator import keep_freed_memory

        if not keep_freed_memory():
            raise SystemExit("keep_freed_memory() does not apply here (not glibc): nothing to compare")
    set_threads(args.threads)
    import bench_roofline
    from rpg.config import load_config

    stage_args = bench_roofline.parse_args(["--config", *map(str, args.config), *args.stage_args])
    cfg = load_config(args.config)
    work = Path(tempfile.mkdtemp(prefix="allocator-"))
    rows = []
    try:
        for stage, dtype, fn in bench_roofline.stages(cfg, stage_args, torch.device("cpu"), work):
            fn()  # warm-up
            walls, faults, system = [], [], []
            for _ in range(args.repeats):
                before = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                fn()
                walls.append(time.perf_counter() - t0)
                after = resource.getrusage(resource.RUSAGE_SELF)
                faults.append(after.ru_minflt - before.ru_minflt)
                system.append(after.ru_stime - before.ru_stime)
            rows.append({"stage": stage, "dtype": dtype, "seconds": statistics.median(walls),
                         "minor_faults": statistics.median(faults), "system_seconds": statistics.median(system)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        row["peak_rss_mb"] = peak_rss_mb()
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return []
    base = [sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads), "--repeats",
            str(args.repeats), "--config", *map(str, args.config)]
    runs: dict[str, list[list[dict]]] = {s: [] for s in SETTINGS}
    for r in range(args.rounds):
        for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
            out = subprocess.run([*base, "--child", setting, "--stage-args", *args.stage_args], capture_output=True,
                                 text=True, check=True).stdout
            runs[setting].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1} {setting:10s} " + "  ".join(f"{x['stage']} {x['seconds']:.2f} s"
                                                              for x in runs[setting][-1]), flush=True)
    rows = []
    for i, first in enumerate(runs[SETTINGS[0]][0]):
        row = {"stage": first["stage"], "dtype": first["dtype"]}
        for setting in SETTINGS:
            per_round = [run[i] for run in runs[setting]]
            for key in ("seconds", "minor_faults", "system_seconds", "peak_rss_mb"):
                row[f"{key}_{setting}"] = statistics.median(x[key] for x in per_round)
        row["ratio"] = row["seconds_system"] / row["seconds_keep_freed"]
        rows.append(row)
        print(f"{row['stage']:28s} system {row['seconds_system']:7.3f} s ({row['minor_faults_system']:>9,.0f} faults)"
              f"  keep_freed {row['seconds_keep_freed']:7.3f} s ({row['minor_faults_keep_freed']:>9,.0f} faults)"
              f"  ratio {row['ratio']:.2f}")
    config = {**{k: v for k, v in vars(args).items() if k != "child"}, "config": [str(p) for p in args.config]}
    write_results(args.out, rows, config, "cpu")
    write_lscpu(args.out)
    return rows


if __name__ == "__main__":
    main()
