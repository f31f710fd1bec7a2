"""Shared helpers of the benchmarks: machine description, CSV/JSON output, timing and memory probes.

Every benchmark writes `results/benchmarks/<name>.csv` whose rows carry the machine columns below and the run's
config (as a JSON string), plus `<name>.json` with the same information, so a number is never separated from the
machine and settings that produced it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from rpg.utils import write_csv_atomic, write_json_atomic  # noqa: E402


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(device: str | torch.device) -> dict[str, Any]:
    """Columns describing where a number was measured (added to every CSV row)."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = cpu_flags()
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if on_cuda else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpus_allowed": affinity,  # `taskset -c 1` -> 1
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "amx_bf16": "amx_bf16" in flags,
        "load_avg_1min": round(os.getloadavg()[0], 2),  # other work on the machine skews CPU timings
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_results(out: str | Path, rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any],
                  device: str | torch.device) -> None:
    """CSV (rows + machine columns + config as JSON) and a JSON sidecar with config, machine and rows."""
    import pandas as pd

    machine = machine_info(device)
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in config.items()}
    frame = pd.DataFrame([{**row, **machine, "config": json.dumps(cfg, sort_keys=True)} for row in rows])
    write_csv_atomic(out, frame)
    write_json_atomic(Path(out).with_suffix(".json"), {"config": cfg, "machine": machine, "argv": sys.argv,
                                                       "python": platform.python_version(),
                                                       "platform": platform.platform(), "rows": list(rows)})
    print(f"wrote {out} and {Path(out).with_suffix('.json')}")


def write_lscpu(beside: str | Path) -> None:
    """`lscpu.txt` in the folder of a benchmark's CSV `beside` (nothing where lscpu is missing)."""
    try:
        Path(beside).with_name("lscpu.txt").write_text(subprocess.run(["lscpu"], capture_output=True,
                                                                      text=True).stdout)
    except OSError:
        pass


def set_threads(threads: int) -> None:
    """0 keeps torch's default; benchmarks on a shared machine use 1 (plus `taskset -c <core>`)."""
    if threads > 0:
        torch.set_num_threads(threads)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """Wall-clock seconds of fn() (CUDA work included), CPU seconds of this process during it, and its result.

    On a busy machine where other processes share the pinned core, wall time includes the time the process waited
    for the core; CPU time (user + system, all threads) does not, and is the steadier measure of work there.
    """
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, result


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float]:
    """Median wall-clock and process-CPU seconds of fn() over `repeats` runs after one warm-up run."""
    fn()  # warm-up (allocator, AdamW state, kernel selection / Triton autotuning)
    runs = [timed(fn, device)[:2] for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def rss_mb() -> float:
    """Resident set size of this process now (MiB)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process since start or the last `reset_peak_rss` (VmHWM), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0: write 5 to /proc/self/clear_refs).

    Returns False where that is not possible; peaks then include everything the process did before.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
