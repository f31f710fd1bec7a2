"""Training memory vs. model size: peak memory and step time of RPG training steps as the number of generated
parameters grows (10K -> 10M), with a fixed RPG (the `cpu_tiny` preset by default) and a fixed diffusion batch.
The paper's Fig. 9b claim: memory grows far slower than linearly in the parameter count, because only
`diffusion_batch` tokens per step go through the denoiser. The fitted exponent of memory ~ params^k is reported.

Each size runs in a FRESH subprocess (peak memory of one size never contaminates another):
  * data: `--checkpoints` synthetic random "checkpoints" of P parameters (a few 2-D layers), tokenised by
    rpg.tokenize.Tokenizer; `data_mb` is the size of the token tensor (linear in P by nature, reported apart);
  * one training step = rpg.train's step: DiffusionObjective (recurrent model over all tokens of `--batch-size`
    checkpoints, a random `--diffusion-batch` subset through the denoiser), backward, grad-clip, AdamW (the same
    parameter groups as rpg.train.train_rpg);
  * `train_peak_mb` (CPU) = peak RSS during the steps (VmHWM, reset just before the first step) minus RSS just
    before it: activations, gradients, AdamW state, allocator caches. This is the number fitted. `process_peak_mb`
    is the absolute peak (Python, torch, model, data included). On CUDA: max_memory_allocated minus allocated before;
  * `step_s` / `step_cpu_s`: median wall clock / process CPU time of the timed steps after one warm-up step.
The "baseline" row: the generator's parameters, and what parameters + gradients + AdamW state need (4 floats each).

Levers, side by side in one run with `--variants` (one line per configuration, exponents per configuration, the
1M-30M exponent of the issue's target included):
  * `off` / `layer` / `segment`: no activation checkpointing / rpg.checkpoint_activations (one Mamba block at a time
    over all tokens) / plus rpg.checkpoint_tokens = `--checkpoint-tokens` (segments of tokens through the stack);
  * `@paper` (or `@4096`): the token size of the paper's preset for each size (d_model stays the preset's);
  * `+mmap` (or `+mmap=BYTES`): run the size with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB. glibc raises its
    mmap threshold after each large free (up to 32 MiB), so later large tensors come from the heap, where
    long-lived pieces (segment outputs, states, gradients) interleave with freed blocks: the peak RSS then grows
    with the number of segments although the live tensors do not. A fixed threshold returns large blocks to the
    system; it costs page faults (time). The same environment variable works for `rpg train` / snakemake;
  * bf16: `--bf16` is CUDA autocast only; fp32 on CPUs (bf16 autocast on a CPU without AMX/avx512_bf16 is slower
    and is not what rpg.train does).

    taskset -c 1 .venv/bin/python benchmarks/bench_train_memory.py --threads 1 --steps 1 --gen-steps 2 \
        --params 10000 100000 1000000 3000000 10000000 30000000 --checkpoint-tokens 1024 \
        --variants 'off<=1e7' 'layer<=1e7' segment segment+mmap off@paper --diffusion-positions 65536

    taskset -c 1 .venv/bin/python benchmarks/bench_train_memory.py --threads 1             # the README's numbers
    .venv/bin/python benchmarks/bench_train_memory.py --device cuda --bf16 --threads 0 --batch-size 16
Writes results/benchmarks/train_memory.csv (+ .json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import (median_seconds, peak_rss_mb, reset_peak_rss, rss_mb, set_threads, synchronize,  # noqa: E402
                      timed, write_results)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, nargs="+",
                   default=[10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000, 10_000_000],
                   help="generated parameter counts")
    p.add_argument("--size", default="cpu_tiny", help="RPG preset (rpg.config.RPG_MODELS), fixed for all sizes")
    p.add_argument("--token-size", default=None,
                   help="override the preset's token size: an integer, or 'paper' = the token size of the paper's "
                        "preset for each size (Table 15: 256 below 50K parameters, 4096 below 10M, 8192 below 50M, "
                        "then 16384), the rest of --size unchanged")
    p.add_argument("--gen-steps", type=int, default=0,
                   help="also time the generation of one model with DDIM-N (0: off); seconds per generated model at "
                        "DDIM-50 are extrapolated from it (the prototype pass is once per model, the denoiser runs "
                        "once per step over all tokens)")
    p.add_argument("--checkpoints", type=int, default=4, help="synthetic checkpoints (permutation-state rows)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="checkpoints per step (raised where fewer tokens than --diffusion-batch); the recurrent "
                        "model runs over all their tokens (the default profile uses 16 on 66 tokens; 1 keeps 10M "
                        "params = 39K tokens of 256 feasible on a CPU)")
    p.add_argument("--diffusion-batch", type=int, default=256, help="tokens per step through the denoiser")
    p.add_argument("--diffusion-positions", type=int, default=None,
                   help="instead of --diffusion-batch: parameters (token positions) per step through the denoiser, "
                        "so the diffusion batch in tokens shrinks as the token size grows (its memory stays fixed)")
    p.add_argument("--steps", type=int, default=2,
                   help="timed steps after one warm-up step (0: time the warm-up step itself, one step per size)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only, as rpg.train does)")
    p.add_argument("--checkpointing", choices=["off", "on", "both", "layer", "segment"], default="off",
                   help="activation checkpointing in the Mamba stack: layer (= on) = rpg.checkpoint_activations, "
                        "one block at a time over all tokens; segment = also rpg.checkpoint_tokens "
                        "(--checkpoint-tokens per recomputed segment); both = off and layer side by side")
    p.add_argument("--checkpoint-tokens", type=int, default=1024,
                   help="tokens per recomputed segment for --checkpointing segment (rpg.checkpoint_tokens)")
    p.add_argument("--variants", nargs="+", default=None, metavar="CKPT[@TOKEN][<=MAX]",
                   help="several configurations side by side in one run, each CKPT (off|layer|segment), optionally "
                        "@TOKEN (a token size or 'paper') and <=MAX (only the sizes up to MAX generated parameters, "
                        "e.g. off<=1e7 where the plain step would not fit); overrides --checkpointing/--token-size. "
                        "--gen-steps is timed once per token size (generation does not checkpoint)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/benchmarks/train_memory.csv"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one size
    return p.parse_args(argv)


def synthetic_checkpoints(n_params: int, k: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """k random state dicts of ~n_params parameters: 2-D layers of width 64 (a few layers, like a small net)."""
    n_layers = max(2, min(8, round(math.log10(n_params))))
    rows = max(1, n_params // (64 * n_layers))
    gen = torch.Generator().manual_seed(seed)
    return [{f"layer{i}.weight": torch.randn(rows, 64, generator=gen) * 0.05 + 0.01 * i for i in range(n_layers)}
            for _ in range(k)]


def run_size(job: dict[str, Any]) -> dict[str, Any]:
    """Build data + fixed RPG + AdamW for one size, then time the steps and measure their peak memory."""
    from rpg.diffusion import GaussianDiffusion
    from rpg.config import RPG_MODELS, DiffusionConfig, paper_size, resolve_model_config
    from rpg.generate import sample_models
    from rpg.model import RPG
    from rpg.tokenize import Tokenizer
    from rpg.train import DiffusionObjective, _param_groups

    set_threads(job["threads"])
    device = torch.device(job["device"])
    torch.manual_seed(job["seed"])
    rss_start = rss_mb()
    section = {"size": job["size"], "condition": "none", "permutation_state": True,
               "checkpoint_activations": job["checkpointing"] in ("layer", "segment"),
               "checkpoint_tokens": job["checkpoint_tokens"] if job["checkpointing"] == "segment" else None}
    if job["token_size"] == "paper":
        section["token_size"] = RPG_MODELS[paper_size(job["n_params"])]["token_size"]
    elif job["token_size"]:
        section["token_size"] = int(job["token_size"])
    cfg = resolve_model_config(section)
    sds = synthetic_checkpoints(job["n_params"], job["checkpoints"], job["seed"])
    tokenizer = Tokenizer.fit(sds, cfg.token_size)
    tokens = torch.stack([tokenizer.tokenize(sd) for sd in sds]).to(device)  # (K, N, L)
    del sds
    k, n, length = tokens.shape
    if job.get("diffusion_positions"):
        job = {**job, "diffusion_batch": max(1, job["diffusion_positions"] // length)}
    # The denoiser must always see exactly `diffusion_batch` tokens: small models get more checkpoints per step.
    batch_size = max(job["batch_size"], math.ceil(job["diffusion_batch"] / n))
    model = RPG(cfg, tokenizer.layer_index, tokenizer.token_index, n_permutation_states=k).to(device)
    objective = DiffusionObjective(model, GaussianDiffusion())
    optimizer = torch.optim.AdamW(_param_groups(model, 1e-5), lr=1e-4)
    mask = tokenizer.mask.to(device)
    gen = torch.Generator().manual_seed(job["seed"] + 1)
    noise_gen = torch.Generator(device=device).manual_seed(job["seed"] + 2)
    use_bf16 = job["bf16"] and device.type == "cuda"

    def step() -> float:
        idx = torch.randint(0, k, (batch_size,), generator=gen)
        picked = torch.randperm(batch_size * n, generator=gen)[: job["diffusion_batch"]]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            loss = objective(tokens, idx.to(device), mask, picked.to(device), idx.to(device), None, noise_gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    rss_before = rss_mb()
    peak_reset = reset_peak_rss()
    # The warm-up step allocates AdamW state and allocator caches (part of the measured peak).
    if job["steps"] > 0:
        step_s, step_cpu_s = median_seconds(step, device, job["steps"])
    else:  # --steps 0: the warm-up step alone, timed (includes AdamW's state allocation: slightly pessimistic)
        step_s, step_cpu_s, _ = timed(step, device)
    peak = peak_rss_mb()
    n_gen = sum(p.numel() for p in model.parameters())
    result = {"n_params": tokenizer.n_params, "n_tokens": n, "token_size": length,
              "batch_size": batch_size, "tokens_through_recurrent_per_step": batch_size * n,
              "diffusion_batch": job["diffusion_batch"],
              "step_s": step_s, "step_cpu_s": step_cpu_s,
              "train_peak_mb": peak - rss_before if peak_reset else float("nan"), "process_peak_mb": peak,
              "rss_before_steps_mb": rss_before, "rss_at_start_mb": rss_start,
              "data_mb": tokens.numel() * tokens.element_size() / 2**20, "generator_params": n_gen}
    if device.type == "cuda":
        result["cuda_train_peak_mb"] = (torch.cuda.max_memory_allocated(device) - cuda_before) / 2**20
    if job.get("gen_steps"):
        del optimizer, objective
        diffusion_cfg = DiffusionConfig(sampler="ddim", sample_steps=job["gen_steps"])
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            sample_models(model, tokenizer, diffusion_cfg, 1, seed=job["seed"], mode="partial",
                          tokens_per_call=max(1, 65536 // length))  # 256 tokens of 256 values per denoiser call
        synchronize(device)
        gen_s, gen_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        result.update(gen_ddim_steps=job["gen_steps"], gen_s=gen_s, gen_cpu_s=gen_cpu_s,
                      gen_s_per_model_ddim50_est=gen_s * 50 / job["gen_steps"])
    return result


def fit_exponent(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y on log x."""
    lx, ly = [math.log(v) for v in x], [math.log(v) for v in y]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def parse_variant(spec: str) -> dict[str, Any]:
    """'segment@paper<=3e7' -> {'checkpointing': 'segment', 'token_size': 'paper', 'max_params': 30000000}."""
    rest, _, max_params = spec.partition("<=")
    ckpt, _, token = rest.partition("@")
    ckpt, _, mmap = ckpt.partition("+mmap")
    ckpt = {"on": "layer"}.get(ckpt, ckpt)
    if ckpt not in ("off", "layer", "segment"):
        raise ValueError(f"variant {spec!r}: checkpointing must be off, layer or segment")
    return {"checkpointing": ckpt, "token_size": token or None,
            "max_params": int(float(max_params)) if max_params else None,
            "malloc_mmap_threshold": (int(float(mmap.lstrip("="))) if mmap.lstrip("=") else 2**20)
            if "+mmap" in spec else None}


def variant_name(job: dict[str, Any]) -> str:
    name = job["checkpointing"] + (f"/{job['checkpoint_tokens']}" if job["checkpointing"] == "segment" else "")
    if job.get("malloc_mmap_threshold"):
        name += f"+mmap{job['malloc_mmap_threshold'] // 1024}K"
    return name + (f"@{job['token_size']}" if job.get("token_size") else "")


def local_exponents(rows: Sequence[dict[str, Any]], key: str, lo: float = 1e6, hi: float = 3e7) -> dict[str, float]:
    """Exponents between consecutive sizes (stored in the rows) and the slope of log memory between the sizes
    closest to `lo` and `hi` (the issue's target range), least squares over the sizes in between."""
    for a, b in zip(rows, rows[1:]):
        b["local_exponent"] = math.log(b[key] / a[key]) / math.log(b["n_params"] / a["n_params"])
    inside = [r for r in rows if 0.9 * lo <= r["n_params"] <= 1.1 * hi]
    out = {}
    if len(inside) > 1:
        out["range_exponent"] = fit_exponent([r["n_params"] for r in inside], [r[key] for r in inside])
        out["range_endpoints_exponent"] = (math.log(inside[-1][key] / inside[0][key])
                                           / math.log(inside[-1]["n_params"] / inside[0]["n_params"]))
        out["range"] = f"{inside[0]['n_params']}-{inside[-1]['n_params']}"
    return out


def measure_sizes(args: argparse.Namespace, job_base: dict[str, Any], params: Sequence[int],
                  gen_done: set) -> list[dict[str, Any]]:
    """One fresh process per size; rows with the fitted and local exponents, then a summary row, printed."""
    rows = []
    name = variant_name(job_base)
    for n_params in params:
        token_key = job_base.get("token_size") or "preset"
        gen_steps = job_base["gen_steps"] if (token_key, n_params) not in gen_done else 0
        job = {**job_base, "n_params": n_params, "gen_steps": gen_steps}
        env = dict(os.environ)
        if job_base.get("malloc_mmap_threshold"):
            # glibc: a fixed mmap threshold (no dynamic raise), so that large freed blocks go back to the system
            # instead of fragmenting the heap (see the docstring).
            env["MALLOC_MMAP_THRESHOLD_"] = str(job_base["malloc_mmap_threshold"])
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"size {n_params} ({name}) failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        if gen_steps:
            gen_done.add((token_key, n_params))
        rows.append({"row": "size", "variant": name, "checkpointing": job_base["checkpointing"],
                     "malloc_mmap_threshold": job_base.get("malloc_mmap_threshold"),
                     "checkpoint_tokens": job_base["checkpoint_tokens"] if job_base["checkpointing"] == "segment"
                     else None, "token_size_option": job_base.get("token_size"), **res})
        gen = (f", 1 model DDIM-{res['gen_ddim_steps']} {res['gen_s']:.1f} s (DDIM-50 ~"
               f"{res['gen_s_per_model_ddim50_est']:.0f} s)" if "gen_s" in res else "")
        print(f"  [{name}] {res['n_params']:>10} params, {res['n_tokens']} tokens of {res['token_size']}: step "
              f"{res['step_s']:.3f} s, train peak {res['train_peak_mb']:.0f} MB{gen}", flush=True)

    on_cuda = args.device.startswith("cuda")
    mem_key = "cuda_train_peak_mb" if on_cuda else "train_peak_mb"
    xs = [r["n_params"] for r in rows]
    exponent = fit_exponent(xs, [r[mem_key] for r in rows]) if len(rows) > 1 else float("nan")
    exponent_total = fit_exponent(xs, [r["process_peak_mb"] for r in rows]) if len(rows) > 1 else float("nan")
    exponent_time = fit_exponent(xs, [r["step_cpu_s"] for r in rows]) if len(rows) > 1 else float("nan")
    ranged = local_exponents(rows, mem_key)
    n_gen = rows[0]["generator_params"]
    rows.append({"row": "baseline", "variant": name, "checkpointing": job_base["checkpointing"],
                 "generator_params": n_gen, "model_mb": n_gen * 4 / 2**20,
                 "model_grad_adamw_mb": 4 * n_gen * 4 / 2**20,
                 "rss_at_start_mb": rows[0]["rss_at_start_mb"]})
    for r in rows:
        r.update(fit_exponent_memory=exponent, fit_exponent_process_peak=exponent_total,
                 fit_exponent_step_cpu_time=exponent_time, **ranged)

    print(f"\n[{name}] RPG training step vs generated parameters: preset {args.size}, {n_gen:,} generator params, "
          f"batch >= {args.batch_size} checkpoint(s), diffusion "
          f"{f'positions {args.diffusion_positions}' if args.diffusion_positions else f'batch {args.diffusion_batch}'}"
          f", device {args.device}, {args.threads} torch thread(s){', bf16' if args.bf16 else ''}, activation "
          f"checkpointing {name}")
    print(f"{'params':>10} {'tokens':>7} {'token':>5} {'batch':>5} {'step s':>7} {'CPU s':>7} {'train peak MB':>13} "
          f"{'proc peak MB':>12} {'data MB':>8} {'local k':>7} {'gen s/model':>11} {'RPG params':>11}")
    for r in rows[:-1]:
        loc = f"{r['local_exponent']:7.2f}" if "local_exponent" in r else f"{'':>7}"
        gen = f"{r['gen_s_per_model_ddim50_est']:11.1f}" if "gen_s" in r else f"{'':>11}"
        print(f"{r['n_params']:>10} {r['n_tokens']:>7} {r['token_size']:>5} {r['batch_size']:>5} {r['step_s']:>7.3f} "
              f"{r['step_cpu_s']:>7.3f} "
              f"{r[mem_key]:>13.1f} "
              f"{r['process_peak_mb']:>12.0f} {r['data_mb']:>8.1f} {loc} {gen} {r['generator_params']:>11,}")
    print(f"baseline: generator {n_gen:,} params = {n_gen * 4 / 2**20:.1f} MB; with gradients + AdamW state "
          f"{4 * n_gen * 4 / 2**20:.1f} MB; process after imports {rows[0]['rss_at_start_mb']:.0f} MB")
    print(f"fitted exponent (memory ~ params^k, log-log least squares): train peak k = {exponent:.3f}, process peak "
          f"k = {exponent_total:.3f}; step CPU time k = {exponent_time:.3f}")
    if ranged:
        print(f"between {ranged['range']} params: train peak k = {ranged['range_exponent']:.3f} (least squares), "
              f"{ranged['range_endpoints_exponent']:.3f} (end points)")
    print(flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_size(json.loads(args.worker))))
        return []
    skip = ("params", "out", "worker", "checkpointing", "variants", "token_size")
    job_base = {k: v for k, v in vars(args).items() if k not in skip}
    if args.variants:
        variants = [parse_variant(v) for v in args.variants]
    else:
        names = {"off": ["off"], "on": ["layer"], "layer": ["layer"], "segment": ["segment"],
                 "both": ["off", "layer"]}[args.checkpointing]
        variants = [{"checkpointing": c, "token_size": args.token_size, "max_params": None} for c in names]
    rows: list[dict] = []
    gen_done: set = set()
    for v in variants:
        params = [p for p in args.params if v["max_params"] is None or p <= v["max_params"]]
        rows += measure_sizes(args, {**job_base, "checkpointing": v["checkpointing"], "token_size": v["token_size"],
                                     "malloc_mmap_threshold": v.get("malloc_mmap_threshold")}, params, gen_done)
    if len(variants) > 1:
        mem_key = "cuda_train_peak_mb" if args.device.startswith("cuda") else "train_peak_mb"
        sizes = [r for r in rows if r["row"] == "size"]
        names = list(dict.fromkeys(r["variant"] for r in sizes))
        print("train peak MB (step s) by variant:")
        print(f"{'params':>10} " + " ".join(f"{n:>22}" for n in names))
        for p in sorted({r["n_params"] for r in sizes}):
            cells = []
            for n in names:
                r = next((r for r in sizes if r["variant"] == n and r["n_params"] == p), None)
                cells.append(f"{r[mem_key]:>10.0f} ({r['step_s']:>7.2f} s)" if r else f"{'-':>22}")
            print(f"{p:>10} " + " ".join(cells))
        print("exponent of train peak between ~1M and ~30M params (least squares / end points):")
        for n in names:
            r = next(r for r in sizes if r["variant"] == n)
            if "range_exponent" in r:
                print(f"  {n:>22}: {r['range_exponent']:.3f} / {r['range_endpoints_exponent']:.3f} over {r['range']}")
    config = {**job_base, "params": args.params, "checkpointing": args.checkpointing, "token_size": args.token_size,
              "variants": args.variants,
              "measured": "train peak = VmHWM during warm-up + timed steps minus RSS before them, fresh process per "
                          "size; CUDA: max_memory_allocated delta; step time = median of timed steps"}
    write_results(args.out, rows, config, args.device)
    return rows


if __name__ == "__main__":
    main()
