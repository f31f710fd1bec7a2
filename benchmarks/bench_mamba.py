"""Mamba2 fallback: the chunked pure-PyTorch SSD scan (rpg.nn.ssd.ssd_chunked) vs. the naive sequential scan.

Times forward + backward of the Mamba2 scan alone (the part with no plain-PyTorch equivalent in mamba_ssm) on
inputs shaped like a Mamba2 layer of width --d-model, for sequence lengths 64 ... 4096, both in the same run, and
checks that they agree (speed-ups from wall time and from process CPU time, the steadier one on a shared core):
max |difference| of the outputs and of the input gradients, relative to the output's
scale, must be <= --rtol (float32 summation order differs; the tests check float64 to 1e-8).
Target (issue 6): chunked >= 5x faster than the naive scan at length >= 1024.

With --device cuda and mamba_ssm importable, each length also runs a whole rpg.nn.Mamba2 layer with the
mamba_ssm fused kernel vs. the same layer (same weights) on the PyTorch path, on the GPU, forward + backward,
optionally under bf16 autocast (--bf16): the fallback-vs-kernel equivalence check and speed-up.

    taskset -c 1 .venv/bin/python benchmarks/bench_mamba.py --threads 1          # CPU, the README's numbers
    .venv/bin/python benchmarks/bench_mamba.py --device cuda --d-model 256 --chunk-size 256 --bf16   # GPU
Writes results/benchmarks/mamba_scan.csv (+ .json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import median_seconds, set_threads, write_results  # noqa: E402

from rpg.nn.ssd import ssd_chunked, ssd_naive  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
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
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="max |chunked - naive| / max |naive| allowed, for outputs and input gradients")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="CUDA layer comparison under bf16 autocast")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (0: torch's default). The naive loop's many tiny ops slow down badly "
                        "when other processes compete for the cores; 1 (with taskset) gives steadier timings")
    p.add_argument("--out", type=Path, default=Path("results/benchmarks/mamba_scan.csv"))
    return p.parse_args(argv)


def make_inputs(args: argparse.Namespace, length: int) -> list[torch.Tensor]:
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


def fwd_bwd(fn: Callable, inputs: list[torch.Tensor], chunk_size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward + backward of a scalar loss; returns the output and the input gradients (detached)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = fn(*leaves, chunk_size=chunk_size)
    y.square().mean().backward()
    return y.detach(), [t.grad for t in leaves]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def kernel_vs_torch_layer(args: argparse.Namespace, length: int, device: torch.device) -> dict:
    """A whole Mamba2 layer: mamba_ssm fused kernel vs. the PyTorch path (same module, same weights), fwd+bwd."""
    from rpg.nn.mamba import MAMBA_SSM_AVAILABLE, Mamba2

    if device.type != "cuda" or not MAMBA_SSM_AVAILABLE:
        return {}
    torch.manual_seed(args.seed)
    layer = Mamba2(args.d_model, d_state=args.d_state, expand=args.expand, headdim=args.headdim,
                   ngroups=args.ngroups, chunk_size=args.chunk_size).to(device)
    u = torch.randn(args.batch, length, args.d_model, device=device)

    def run(backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        layer.backend = backend
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16):
            y = layer(u)
        y.float().square().mean().backward()
        return y.detach(), layer.in_proj.weight.grad.detach().clone()

    y_k, g_k = run("cuda")
    y_t, g_t = run("torch")
    return {"layer_kernel_s": median_seconds(lambda: run("cuda"), device, args.repeats)[0],
            "layer_torch_s": median_seconds(lambda: run("torch"), device, args.repeats)[0],
            "layer_rel_err_out": rel_err(y_k, y_t), "layer_rel_err_grad": rel_err(g_k, g_t)}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    rows = []
    for length in args.lengths:
        inputs = make_inputs(args, length)
        y_c, g_c = fwd_bwd(ssd_chunked, inputs, args.chunk_size)
        y_n, g_n = fwd_bwd(ssd_naive, inputs, args.chunk_size)
        err_out = rel_err(y_c, y_n)
        err_grad = max(rel_err(a, b) for a, b in zip(g_c, g_n))
        t_c, cpu_c = median_seconds(lambda: fwd_bwd(ssd_chunked, inputs, args.chunk_size), device, args.repeats)
        t_n, cpu_n = median_seconds(lambda: fwd_bwd(ssd_naive, inputs, args.chunk_size), device, args.repeats)
        row = {"length": length, "chunked_s": t_c, "naive_s": t_n, "speedup": t_n / t_c, "chunked_cpu_s": cpu_c,
               "naive_cpu_s": cpu_n, "speedup_cpu": cpu_n / cpu_c,
               "rel_err_out": err_out, "rel_err_grad": err_grad,
               "equal_within_rtol": err_out <= args.rtol and err_grad <= args.rtol,
               **kernel_vs_torch_layer(args, length, device)}
        rows.append(row)
        print(f"  L={length}: chunked {t_c:.4f}s naive {t_n:.4f}s ({t_n / t_c:.1f}x)", flush=True)

    nheads = args.expand * args.d_model // args.headdim
    print(f"\nSSD scan fwd+bwd, batch {args.batch}, {nheads} heads x headdim {args.headdim}, d_state {args.d_state}, "
          f"chunk {args.chunk_size}, {args.dtype}, {device}, {torch.get_num_threads()} torch thread(s)")
    print(f"{'length':>7} {'chunked_s':>10} {'naive_s':>10} {'speedup':>8} {'CPU-time':>8} {'rel_err_out':>11} "
          f"{'rel_err_grad':>12} "
          f"{'equal':>6}")
    for r in rows:
        print(f"{r['length']:>7} {r['chunked_s']:>10.4f} {r['naive_s']:>10.4f} {r['speedup']:>7.1f}x "
              f"{r['speedup_cpu']:>7.1f}x "
              f"{r['rel_err_out']:>11.1e} {r['rel_err_grad']:>12.1e} {str(r['equal_within_rtol']):>6}")
        if "layer_kernel_s" in r:
            print(f"{'':>7} Mamba2 layer: kernel {r['layer_kernel_s']:.4f}s, torch {r['layer_torch_s']:.4f}s "
                  f"({r['layer_torch_s'] / r['layer_kernel_s']:.1f}x), rel err out {r['layer_rel_err_out']:.1e} "
                  f"grad {r['layer_rel_err_grad']:.1e}")
    config = {**vars(args), "nheads": nheads,
              "measured": "forward + backward of the SSD scan alone, median of --repeats after one warm-up"}
    write_results(args.out, rows, config, device)
    return rows


if __name__ == "__main__":
    main()
