"""Benchmark: chunked pure-PyTorch SSD scan (rpg.nn.ssd.ssd_chunked) vs the naive sequential scan.

Times forward + backward of the Mamba2 scan alone (the part with no PyTorch equivalent in mamba_ssm), on
inputs shaped like a Mamba2 layer of width --d-model, and checks that both agree. Writes
``results/benchmarks/mamba_scan.csv`` (one row per length) and the run's config beside it as ``.json``.

    python benchmarks/bench_mamba.py                       # CPU, small layer, L = 64 ... 4096
    python benchmarks/bench_mamba.py --device cuda --d-model 768 --chunk-size 256
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from rpg.nn.ssd import ssd_chunked, ssd_naive  # noqa: E402

COLUMNS = ["device", "length", "chunked_s", "naive_s", "speedup", "max_abs_err"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024, 4096], help="sequence lengths")
    p.add_argument("--d-model", type=int, default=64, help="layer width; d_inner = expand * d_model")
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--headdim", type=int, default=32)
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--ngroups", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=64,
                   help="SSD chunk length (mamba_ssm's default is 256; 64 is faster on CPU)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default). Many tiny ops, as in the naive loop, slow "
                        "down badly when other processes compete for the cores; 1 gives steadier timings there")
    p.add_argument("--out", type=Path, default=Path("results/benchmarks/mamba_scan.csv"))
    return p.parse_args(argv)


def make_inputs(args: argparse.Namespace, length: int) -> List[torch.Tensor]:
    """Random scan inputs with Mamba2's scales: dt ~ softplus around [1e-3, 1e-1], A = -U[1, 16]."""
    gen = torch.Generator().manual_seed(args.seed + length)
    dtype = getattr(torch, args.dtype)
    nheads = args.expand * args.d_model // args.headdim
    b, h, p, g, n = args.batch, nheads, args.headdim, args.ngroups, args.d_state
    x = torch.randn(b, length, h, p, generator=gen, dtype=dtype)
    dt = F.softplus(torch.randn(b, length, h, generator=gen, dtype=dtype) - 3.0)
    A = -torch.empty(h, dtype=dtype).uniform_(1.0, 16.0, generator=gen)
    B = torch.randn(b, length, g, n, generator=gen, dtype=dtype) / n ** 0.5
    C = torch.randn(b, length, g, n, generator=gen, dtype=dtype) / n ** 0.5
    return [t.to(args.device) for t in (x, dt, A, B, C)]


def fwd_bwd(fn: Callable, inputs: List[torch.Tensor], chunk_size: int) -> torch.Tensor:
    """One forward + backward; returns the (detached) output."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = fn(*leaves, chunk_size=chunk_size)
    y.square().mean().backward()
    return y.detach()


def time_it(fn: Callable, inputs: List[torch.Tensor], args: argparse.Namespace) -> float:
    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    fwd_bwd(fn, inputs, args.chunk_size)  # warm-up (allocator, kernel selection)
    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        fwd_bwd(fn, inputs, args.chunk_size)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    on_cuda = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name(args.device) if on_cuda else (platform.processor() or "cpu")
    rows = []
    print(f"{'device':>8} {'length':>7} {'chunked_s':>10} {'naive_s':>10} {'speedup':>8} {'max_abs_err':>11}")
    for length in args.lengths:
        inputs = make_inputs(args, length)
        y_chunked = fwd_bwd(ssd_chunked, inputs, args.chunk_size)
        y_naive = fwd_bwd(ssd_naive, inputs, args.chunk_size)
        err = (y_chunked - y_naive).abs().max().item()
        t_chunked = time_it(ssd_chunked, inputs, args)
        t_naive = time_it(ssd_naive, inputs, args)
        row = dict(device=args.device, length=length, chunked_s=f"{t_chunked:.6f}", naive_s=f"{t_naive:.6f}",
                   speedup=f"{t_naive / t_chunked:.2f}", max_abs_err=f"{err:.3e}")
        rows.append(row)
        print(f"{args.device:>8} {length:>7} {t_chunked:>10.4f} {t_naive:>10.4f} {t_naive / t_chunked:>8.2f} "
              f"{err:>11.2e}", flush=True)

    with tempfile.SpooledTemporaryFile(mode="w+", newline="") as buf:
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        buf.seek(0)
        atomic_write_text(args.out, buf.read())
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(
        nheads=args.expand * args.d_model // args.headdim,
        measured="forward + backward of the SSD scan alone, median of --repeats after one warm-up",
        torch_version=torch.__version__, python_version=platform.python_version(), platform=platform.platform(),
        device_name=device_name, torch_num_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
        load_average_after=os.getloadavg(),  # other work on the machine skews CPU timings
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), argv=sys.argv[1:] if argv is None else list(argv),
    )
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(config, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return rows


if __name__ == "__main__":
    main()
