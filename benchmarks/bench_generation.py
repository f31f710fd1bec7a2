"""Generation: seconds and peak memory per generated model, per generation mode and per sampler / step count, with
the accuracy of the generated heads on unseen tasks (the paper's Tables 8 and 18, on the CPU default profile).

Uses a trained task-conditioned RPG (default: the default profile's `results/rpg/cifar10_binary/best.safetensors`;
`--results DIR` for another results folder),
the split (unseen tasks) and the cached test features. Every configuration runs in a FRESH subprocess, so its memory
is not mixed with another's:
  * seconds: wall clock of `generate_tokens` + detokenising (prototypes, all denoiser calls), after a tiny warm-up
    call; divided by the number of models generated together. Also the process's CPU seconds (user + system): on a
    core shared with other processes wall time includes waiting for it, CPU time does not;
  * memory on CPU: peak resident set size (VmHWM of /proc/self/status, reset via /proc/self/clear_refs just before
    the timed call) minus the RSS just before it = the extra memory the generation needed (`gen_peak_mb`), and the
    process's absolute peak (`process_peak_mb`, includes Python, torch and the loaded generator). RSS counts pages
    really touched, including torch's allocator caches; it is what the OS had to give the process;
  * memory on CUDA: torch.cuda.max_memory_allocated during the timed call minus allocated memory before it;
  * accuracy: mean test accuracy of the generated heads on their unseen tasks (same tasks, samples and initial
    noise for every step count), and its difference to DDPM-1000, measured in the same run.
Rows: modes sequential / partial / full with the default sampler; the default sampler for ONE model (the target:
<= 2 s on this CPU); DDIM at each --ddim-steps and DDPM-1000 (partial mode), with accuracy.

    taskset -c 1 .venv/bin/python benchmarks/bench_generation.py --threads 1          # the README's numbers
    .venv/bin/python benchmarks/bench_generation.py --device cuda --bf16 --threads 0  # on a GPU (bf16 autocast)
Writes results/benchmarks/generation.csv (+ .json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import peak_rss_mb, reset_peak_rss, rss_mb, set_threads, synchronize, write_results  # noqa: E402



def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results"),
                   help="a default-profile results folder; the four paths below default to files in it")
    p.add_argument("--rpg", type=Path, default=None,
                   help="trained RPG checkpoint (default: RESULTS/rpg/cifar10_binary/best.safetensors)")
    p.add_argument("--split", type=Path, default=None, help="default: RESULTS/zoo/cifar10_binary/split.json")
    p.add_argument("--features", type=Path, default=None,
                   help="cached features, whose test split scores the generated heads; 'none' skips accuracy "
                        "(default: RESULTS/features/cifar10_binary/features.safetensors)")
    p.add_argument("--zoo", type=Path, default=None,
                   help="zoo folder: the unseen tasks' original heads are scored for reference; 'none' skips "
                        "(default: RESULTS/zoo/cifar10_binary)")
    p.add_argument("--tasks", type=int, default=4, help="unseen tasks used (first N of the split's unseen list)")
    p.add_argument("--samples", type=int, default=1, help="models generated per task")
    p.add_argument("--sampler", default="ddim", help="default sampler (the profile's: ddim)")
    p.add_argument("--steps", type=int, default=50, help="default sampler steps (the profile's: 50)")
    p.add_argument("--ddim-steps", type=int, nargs="+", default=[20, 60, 100, 200], help="DDIM step counts")
    p.add_argument("--no-ddpm", action="store_true", help="skip DDPM-1000 (slowest row)")
    p.add_argument("--modes", nargs="+", default=["sequential", "partial", "full"])
    p.add_argument("--mode-samples", type=int, default=4,
                   help="models generated together in the mode rows (sequential is ~100x slower per token)")
    p.add_argument("--tokens-per-call", type=int, default=256, help="partial mode: tokens per denoiser call")
    p.add_argument("--clip-x0", type=float, default=4.0)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast of the sampling passes (train.amp: bf16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/benchmarks/generation.csv"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    args = p.parse_args(argv)
    defaults = {"rpg": "rpg/cifar10_binary/best.safetensors", "split": "zoo/cifar10_binary/split.json",
                "features": "features/cifar10_binary/features.safetensors", "zoo": "zoo/cifar10_binary"}
    for key, rel in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, args.results / rel)
    return args


# ----------------------------------------------------------------------------------------------------------------
# One configuration (in its own process)
# ----------------------------------------------------------------------------------------------------------------


def run_config(job: dict[str, Any]) -> dict[str, Any]:
    """Generate job['n_models'] heads once, measuring seconds and memory; then score them (not timed)."""
    from rpg.checkpoint import load_rpg
    from rpg.diffusion import create_diffusion
    from rpg.generate import generate_tokens
    from rpg.experiments.task_zoo.tasks import embedding_bits

    set_threads(job["threads"])
    device = torch.device(job["device"])
    model, tokenizer, diffusion_cfg, _ = load_rpg(job["rpg"], device)
    diffusion = create_diffusion(diffusion_cfg)
    task_ids = [t for t in job["task_ids"] for _ in range(job["samples"])]
    cond = embedding_bits(task_ids) if model.task_encoder is not None else None
    kwargs = dict(sampler=job["sampler"], steps=job["steps"], eta=job["eta"], clip_x0=job["clip_x0"],
                  mode=job["mode"], tokens_per_call=job["tokens_per_call"], amp="bf16" if job["bf16"] else "none")

    def generate(n: int, **over) -> list[dict[str, torch.Tensor]]:
        tokens = generate_tokens(model, diffusion, n, cond=None if cond is None else cond[:n],
                                 generator=torch.Generator().manual_seed(job["seed"]), **{**kwargs, **over})
        return [tokenizer.detokenize(t) for t in tokens]

    generate(1, sampler="ddim", steps=2)  # warm-up: allocator, first-call overheads
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    rss_before = rss_mb()
    peak_reset = reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    state_dicts = generate(len(task_ids))
    synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result = {"seconds_total": seconds, "seconds_per_model": seconds / len(task_ids),
              "cpu_seconds_per_model": cpu_seconds / len(task_ids),
              "rss_before_mb": rss_before, "process_peak_mb": peak_rss_mb(),
              "gen_peak_mb": peak_rss_mb() - rss_before if peak_reset else float("nan")}
    if device.type == "cuda":
        result["cuda_gen_peak_mb"] = (torch.cuda.max_memory_allocated(device) - base_cuda) / 2**20
    result["n_tokens_per_model"] = model.n_tokens
    result["generated_params_per_model"] = tokenizer.n_params
    if job["features"]:
        from rpg.experiments.task_zoo.features import load_features
        from rpg.experiments.task_zoo.heads import evaluate_heads, stack_state_dicts

        feats = load_features(job["features"])
        acc = evaluate_heads(stack_state_dicts(state_dicts), task_ids, feats["test_x"].float(),
                             feats["test_y"])["accuracy"]
        result["accuracy_mean"] = 100 * float(acc.mean())
        result["accuracy_per_model"] = [round(100 * float(a), 3) for a in acc]
    return result


def spawn(job: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter (inherits the CPU affinity); its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"configuration {job['name']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def original_accuracy(zoo: Path, features: Path, task_ids: list[int]) -> float:
    """Mean test accuracy of the unseen tasks' original zoo heads (all their checkpoints)."""
    from rpg.experiments.task_zoo.features import load_features
    from rpg.experiments.task_zoo.heads import checkpoint_path, evaluate_heads, load_task_checkpoints, stack_state_dicts

    k = 0
    while checkpoint_path(zoo, task_ids[0], k).exists():
        k += 1
    sds, _ = load_task_checkpoints(zoo, task_ids, k)
    feats = load_features(features)
    ids = [t for t in task_ids for _ in range(k)]
    acc = evaluate_heads(stack_state_dicts(sds), ids, feats["test_x"].float(), feats["test_y"])["accuracy"]
    return 100 * float(acc.mean())


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_config(json.loads(args.worker))))
        return []
    set_threads(args.threads)
    split = json.loads(args.split.read_text())
    task_ids = list(split["unseen"])[: args.tasks]
    features = None if str(args.features) == "none" else str(args.features)
    base = dict(rpg=str(args.rpg), device=args.device, threads=args.threads, seed=args.seed, eta=args.eta,
                clip_x0=args.clip_x0, tokens_per_call=args.tokens_per_call, bf16=args.bf16, features=None)
    default = dict(sampler=args.sampler, steps=args.steps)
    jobs: list[dict[str, Any]] = []
    for mode in args.modes:  # memory/speed trade-off of the modes, default sampler, no accuracy needed
        jobs.append({**base, **default, "group": "mode", "name": f"{mode} {args.sampler}-{args.steps}", "mode": mode,
                     "task_ids": task_ids[: args.mode_samples], "samples": 1})
    jobs.append({**base, **default, "group": "one model", "name": f"1 model, partial {args.sampler}-{args.steps}",
                 "mode": "partial", "task_ids": task_ids[:1], "samples": 1})
    sampler_rows = [("ddim", s) for s in sorted(set(args.ddim_steps) | {args.steps})]
    sampler_rows += [] if args.no_ddpm else [("ddpm", 1000)]
    for sampler, steps in sampler_rows:
        jobs.append({**base, "group": "sampler", "name": f"{sampler}-{steps}", "sampler": sampler, "steps": steps,
                     "mode": "partial", "task_ids": task_ids, "samples": args.samples, "features": features})

    rows = []
    for job in jobs:
        res = spawn(job)
        n_models = len(job["task_ids"]) * job["samples"]
        rows.append({"group": job["group"], "configuration": job["name"], "mode": job["mode"],
                     "sampler": job["sampler"],
                     "steps": job["steps"], "models": n_models, **{k: v for k, v in res.items()
                                                                     if k != "accuracy_per_model"},
                     "accuracy_per_model": json.dumps(res.get("accuracy_per_model", []))})
        print(f"  {job['name']}: {res['seconds_per_model']:.2f} s/model, gen peak {res['gen_peak_mb']:.0f} MB"
              + (f", acc {res['accuracy_mean']:.2f}" if "accuracy_mean" in res else ""), flush=True)
    ddpm = next((r for r in rows if r["sampler"] == "ddpm" and "accuracy_mean" in r), None)
    for r in rows:
        if ddpm is not None and "accuracy_mean" in r:
            r["acc_minus_ddpm1000"] = r["accuracy_mean"] - ddpm["accuracy_mean"]
    orig = None
    if features and str(args.zoo) != "none" and args.zoo.is_dir():
        orig = original_accuracy(args.zoo, Path(features), task_ids)
        for r in rows:
            if "accuracy_mean" in r:
                r["original_accuracy_mean"] = orig

    print(f"\nGeneration, {args.rpg}, device {args.device}, {args.threads} torch thread(s)"
          f"{', bf16' if args.bf16 else ''}; {rows[0]['n_tokens_per_model']} tokens "
          f"({rows[0]['generated_params_per_model']} params) per model")
    mem_key = "cuda_gen_peak_mb" if args.device.startswith("cuda") else "gen_peak_mb"
    print(f"{'configuration':<34} {'models':>6} {'s/model':>8} {'CPU s':>6} {'gen peak MB':>11} {'proc peak MB':>12} "
          f"{'acc %':>6} {'- DDPM':>7}")
    for r in rows:
        acc = f"{r['accuracy_mean']:6.2f}" if "accuracy_mean" in r else f"{'':>6}"
        gap = f"{r['acc_minus_ddpm1000']:+7.2f}" if "acc_minus_ddpm1000" in r else f"{'':>7}"
        print(f"{r['configuration']:<34} {r['models']:>6} {r['seconds_per_model']:>8.3f} "
              f"{r['cpu_seconds_per_model']:>6.2f} {r[mem_key]:>11.1f} "
              f"{r['process_peak_mb']:>12.0f} {acc} {gap}")
    if orig is not None:
        print(f"original zoo heads of these {len(task_ids)} unseen tasks: {orig:.2f} % mean test accuracy")
    config = {**{k: v for k, v in vars(args).items() if k != "worker"}, "unseen_task_ids": task_ids,
              "measured": "seconds: generate_tokens + detokenize after a warm-up; memory: peak RSS (VmHWM, reset "
                          "before the call) minus RSS before it, one fresh process per row; CUDA: "
                          "max_memory_allocated delta; accuracy: test accuracy of generated heads on unseen tasks"}
    write_results(args.out, rows, config, args.device)
    return rows


if __name__ == "__main__":
    main()
