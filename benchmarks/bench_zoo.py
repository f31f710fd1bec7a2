"""Zoo throughput: all heads batched (rpg.experiments.task_zoo.heads.train_heads) vs. a one-task-at-a-time loop of the same maths
(rpg.experiments.task_zoo.heads.train_head_single), side by side in one run.

Throughput is in task-steps per second of wall time and of this process's CPU time (one AdamW step of one head
`Linear(d,d) -> SiLU -> Linear(d,2)` on a minibatch of `--batch-size` cached features). The loop runs on
`--loop-tasks` tasks (its per-task cost does not depend on the task), once before and once after the batched runs
(a busy machine drifts; the mean is the baseline); on CUDA it runs the same maths with the head on the GPU.
The batched path runs on all `--tasks` tasks in blocks of each `--chunks` size. Also measured, for reference:
  * `autograd_einsum`: the previous batched implementation (einsum forward, autograd, per-block AdamW), kept here;
  * `--experimental`: bf16 GEMMs (AMX where the CPU has it) + a torch.compile'd elementwise middle. This is NOT the
    same maths (bf16 rounding); its max deviation from the float32 heads is reported, and rpg/ does not use it.
Each batched variant's max |difference| to train_head_single on the loop tasks is reported (equal maths check).
On a machine whose cores other processes share, wall time includes waiting for the core and drifts by 2x within a
run; CPU time (user + system) does not, so `speedup_cpu` is the steadier ratio there (single-threaded runs only).

    .venv/bin/python benchmarks/bench_zoo.py                                    # random features, d=128, B=500
    taskset -c 1 .venv/bin/python benchmarks/bench_zoo.py --threads 1          # the README's measurement
    .venv/bin/python benchmarks/bench_zoo.py --device cuda --threads 0 --chunks 1022 256   # on a GPU
Writes results/benchmarks/zoo_throughput.csv (+ .json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import set_threads, timed, write_results  # noqa: E402

from rpg.experiments.task_zoo.tasks import ALL_TASK_IDS, binary_labels  # noqa: E402
from rpg.utils import load_safetensors, resolve_device  # noqa: E402
from rpg.experiments.task_zoo.heads import HEAD_KEYS, head_logits, initial_head, make_head, train_head_single, train_heads  # noqa: E402

HeadTrainer = Callable[..., dict[str, torch.Tensor]]


def train_heads_autograd_einsum(features: torch.Tensor, class_labels: torch.Tensor, task_ids: Sequence[int], *,
                                steps: int, batch_size: int, lr: float, weight_decay: float, seed: int,
                                task_chunk: int) -> dict[str, torch.Tensor]:
    """The previous rpg.experiments.task_zoo.heads.train_heads (einsum forward, autograd backward, one AdamW per block of tasks)."""
    d = features.shape[1]
    init = initial_head(d, seed)
    labels = binary_labels(class_labels, task_ids).to(features.device)
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randint(0, features.shape[0], (batch_size,), generator=gen) for _ in range(steps)]
    out = {}
    for i in range(0, len(task_ids), task_chunk):
        n = min(task_chunk, len(task_ids) - i)
        params = {k: v[None].repeat(n, *[1] * v.ndim).to(features.device).requires_grad_(True) for k, v in init.items()}
        opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay)
        y = labels[i: i + n]
        for step in range(steps):
            idx = batches[step].to(features.device)
            logits = head_logits(params, features[idx])
            loss = F.cross_entropy(logits.reshape(-1, 2), y[:, idx].reshape(-1), reduction="sum") / len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for k, v in params.items():
            out.setdefault(k, []).append(v.detach())
    return {k: torch.cat(v) for k, v in out.items()}


def train_head_single_on_device(features: torch.Tensor, labels: torch.Tensor, *, steps: int, batch_size: int,
                                 lr: float, weight_decay: float, seed: int) -> dict[str, torch.Tensor]:
    """rpg.experiments.task_zoo.heads.train_head_single with the head on the features' device (that function builds it on the CPU)."""
    d = features.shape[1]
    head = make_head(d)
    head.load_state_dict(initial_head(d, seed))
    head.to(features.device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        idx = torch.randint(0, features.shape[0], (batch_size,), generator=gen).to(features.device)
        loss = F.cross_entropy(head(features[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def make_experimental_bf16(compile_middle: bool) -> HeadTrainer:
    """bf16 GEMMs + (optionally) a compiled float32 elementwise middle; otherwise rpg.experiments.task_zoo.heads's algorithm."""

    def middle(h: torch.Tensor, y: torch.Tensor, w2: torch.Tensor):
        b, t = y.shape
        s = torch.sigmoid(h)
        a = h * s
        a3 = a.view(b, t, -1)
        w_diff = w2[:, 1] - w2[:, 0]
        g = (torch.sigmoid((a3 * w_diff).sum(-1)) - y) / b
        g_w2 = (a3 * g.unsqueeze(-1)).sum(0)
        dh3 = (s * (1 + h - a)).view(b, t, -1) * (g.unsqueeze(-1) * w_diff)
        return dh3.reshape(b, -1), dh3.sum(0), torch.stack([-g_w2, g_w2], dim=1)

    mid = torch.compile(middle, dynamic=False) if compile_middle else middle

    def train(features, class_labels, task_ids, *, steps, batch_size, lr, weight_decay, seed, task_chunk):
        d, n_tasks = features.shape[1], len(task_ids)
        init = initial_head(d, seed)
        labels = binary_labels(class_labels, task_ids).T.to(features.device, features.dtype).contiguous()
        gen = torch.Generator().manual_seed(seed + 1)
        batches = [torch.randint(0, features.shape[0], (batch_size,), generator=gen) for _ in range(steps)]
        params = [init[k][None].repeat(n_tasks, *[1] * init[k].ndim).to(features.device) for k in HEAD_KEYS]
        for p in params:
            p.grad = torch.empty_like(p)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        for step in range(steps):
            idx = batches[step].to(features.device)
            x, y = features[idx], labels[idx]
            xb = x.bfloat16()
            for i in range(0, n_tasks, task_chunk):
                rows = slice(i, min(i + task_chunk, n_tasks))
                w1, b1, w2 = (p[rows] for p in params)
                t = w1.shape[0]
                h = (xb @ w1.reshape(t * d, d).T.bfloat16()).float().add_(b1.reshape(1, t * d))
                dh, g_b1, g_w2 = mid(h, y[:, rows], w2)
                params[0].grad[rows] = (dh.T.bfloat16() @ xb).float().view(t, d, d)
                params[1].grad[rows] = g_b1
                params[2].grad[rows] = g_w2
            opt.step()
        return dict(zip(HEAD_KEYS, params))

    return train


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", default=None, help="cached features .safetensors (default: random N(0,1))")
    p.add_argument("--dim", type=int, default=128, help="feature width d (random features)")
    p.add_argument("--n-train", type=int, default=45000, help="rows of random features")
    p.add_argument("--steps", type=int, default=30, help="AdamW steps per head")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--loop-tasks", type=int, default=24, help="tasks trained one at a time (each loop pass)")
    p.add_argument("--tasks", type=int, default=1022, help="tasks trained batched")
    p.add_argument("--chunks", type=int, nargs="+", default=[1022, 64, 16, 8, 4], help="task_chunk values to measure")
    p.add_argument("--reference-chunks", type=int, nargs="*", default=[1022, 8],
                   help="task_chunk values for the previous autograd/einsum implementation (none: skip it)")
    p.add_argument("--experimental", action="store_true",
                   help="also measure bf16 GEMMs + torch.compile'd elementwise (not the same maths; CPU with AMX)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--out", type=Path, default=Path("results/benchmarks/zoo_throughput.csv"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    set_threads(args.threads)
    device = resolve_device(args.device)
    if args.features:
        tensors, _ = load_safetensors(args.features)
        x, y = tensors["train_x"].float(), tensors["train_y"]
    else:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(args.n_train, args.dim, generator=g), torch.randint(0, 10, (args.n_train,), generator=g)
    x, y = x.to(device), y.to(device)
    ids = list(ALL_TASK_IDS[: args.tasks])
    common = dict(steps=args.steps, batch_size=args.batch_size, lr=1e-3, weight_decay=0.01, seed=0)
    loop_labels = binary_labels(y, ids[: args.loop_tasks]).to(device)

    single = train_head_single if device.type == "cpu" else train_head_single_on_device

    def run_loop() -> list[dict[str, torch.Tensor]]:
        return [single(x, loop_labels[i], **common) for i in range(args.loop_tasks)]

    single(x, loop_labels[0], **{**common, "steps": 2})  # warm-up
    loop_s_before, loop_cpu_before, singles = timed(run_loop, device)

    variants: list[tuple[str, int, HeadTrainer]] = []
    for chunk in args.chunks:
        variants.append(("rpg.experiments.task_zoo.heads.train_heads", chunk, lambda *a, **k: {key: v[:, -1] for key, v in train_heads(
            *a, n_checkpoints=1, save_every=1, progress=False, **k).items()}))
    for chunk in args.reference_chunks:
        variants.append(("autograd_einsum (previous)", chunk, train_heads_autograd_einsum))
    if args.experimental:
        variants.append(("EXPERIMENTAL bf16 GEMM + compiled", 8, make_experimental_bf16(device.type == "cpu")))

    results = []
    for name, chunk, fn in variants:
        fn(x, y, ids, task_chunk=chunk, **{**common, "steps": 1})  # warm-up (and compilation)
        seconds, cpu_s, heads = timed(lambda: fn(x, y, ids, task_chunk=chunk, **common), device)
        err = max((heads[k][i].float().cpu() - singles[i][k].cpu()).abs().max().item()
                  for i in range(args.loop_tasks) for k in HEAD_KEYS)
        results.append((name, chunk, seconds, cpu_s, err))
        print(f"  {name} chunk {chunk}: {len(ids) * args.steps / seconds:.0f} task-steps/s wall, "
              f"{len(ids) * args.steps / cpu_s:.0f} per CPU-s", flush=True)

    loop_s_after, loop_cpu_after, _ = timed(run_loop, device)
    work = 2 * args.loop_tasks * args.steps
    loop_rate, loop_cpu_rate = work / (loop_s_before + loop_s_after), work / (loop_cpu_before + loop_cpu_after)
    rows = [{"variant": "loop: rpg.experiments.task_zoo.heads.train_head_single", "task_chunk": 1, "tasks": args.loop_tasks,
             "seconds": (loop_s_before + loop_s_after) / 2, "cpu_seconds": (loop_cpu_before + loop_cpu_after) / 2,
             "task_steps_per_s": loop_rate, "task_steps_per_cpu_s": loop_cpu_rate, "speedup_wall": 1.0,
             "speedup_cpu": 1.0, "max_abs_diff_vs_loop": 0.0,
             "loop_rate_before": args.loop_tasks * args.steps / loop_s_before,
             "loop_rate_after": args.loop_tasks * args.steps / loop_s_after}]
    for name, chunk, seconds, cpu_s, err in results:
        rate, cpu_rate = len(ids) * args.steps / seconds, len(ids) * args.steps / cpu_s
        rows.append({"variant": name, "task_chunk": chunk, "tasks": len(ids), "seconds": seconds,
                     "cpu_seconds": cpu_s, "task_steps_per_s": rate, "task_steps_per_cpu_s": cpu_rate,
                     "speedup_wall": rate / loop_rate, "speedup_cpu": cpu_rate / loop_cpu_rate,
                     "max_abs_diff_vs_loop": err})
    for row in rows:
        row["full_zoo_200_steps_min"] = 1022 * 200 / row["task_steps_per_s"] / 60
    print(f"\nZoo throughput, d={x.shape[1]}, batch {args.batch_size}, {args.steps} steps, device {device}, "
          f"{torch.get_num_threads()} torch thread(s)")
    print(f"{'variant':<36} {'chunk':>5} {'tasks':>5} {'/wall-s':>8} {'vs loop':>8} {'/CPU-s':>7} {'vs loop':>8} "
          f"{'max|diff|':>9} {'zoo min':>7}")
    for r in rows:
        print(f"{r['variant']:<36} {r['task_chunk']:>5} {r['tasks']:>5} {r['task_steps_per_s']:>8.0f} "
              f"{r['speedup_wall']:>7.2f}x {r['task_steps_per_cpu_s']:>7.0f} {r['speedup_cpu']:>7.2f}x "
              f"{r['max_abs_diff_vs_loop']:>9.1e} {r['full_zoo_200_steps_min']:>7.1f}")
    print(f"(loop before / after the batched runs: {rows[0]['loop_rate_before']:.0f} / "
          f"{rows[0]['loop_rate_after']:.0f} task-steps/s; 'zoo min' = 1022 tasks x 200 steps)")
    config = {**vars(args), "dim": int(x.shape[1]), "lr": 1e-3, "weight_decay": 0.01,
              "measured": "wall-clock of whole trainings (init, batches, AdamW) after a warm-up; loop = mean of a "
                          "pass before and after the batched runs"}
    write_results(args.out, rows, config, device)
    return rows


if __name__ == "__main__":
    main()
