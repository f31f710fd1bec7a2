"""Zoo throughput: all heads at once (rpg.zoo.train_heads) vs. a one-task-at-a-time loop of the same maths
(rpg.zoo.train_head_single), measured side by side in one run. Prints and writes
results/benchmarks/zoo_throughput.csv (+ .json with the machine and settings).

    .venv/bin/python benchmarks/bench_zoo.py                       # random features, d=128, batch 500
    .venv/bin/python benchmarks/bench_zoo.py --features results/features/cifar10_binary/features.safetensors

Throughput is in task-steps per second (one AdamW step of one head); the loop runs on a subset of tasks (the
per-task cost does not depend on which task it is), the batched run on all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import pandas as pd
import torch

from rpg.tasks import ALL_TASK_IDS, binary_labels
from rpg.utils import load_safetensors, resolve_device, write_csv_atomic, write_json_atomic
from rpg.zoo import train_head_single, train_heads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", default=None, help="cached features (default: random N(0,1) features)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n-train", type=int, default=45000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--loop-tasks", type=int, default=20, help="tasks trained one at a time")
    p.add_argument("--tasks", type=int, default=1022, help="tasks trained batched")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="results/benchmarks/zoo_throughput.csv")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.features:
        tensors, _ = load_safetensors(args.features)
        x, y = tensors["train_x"], tensors["train_y"]
    else:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(args.n_train, args.dim, generator=g), torch.randint(0, 10, (args.n_train,), generator=g)
    x, y = x.to(device), y.to(device)
    ids = list(ALL_TASK_IDS[: args.tasks])
    common = dict(steps=args.steps, batch_size=args.batch_size, lr=1e-3, weight_decay=0.0, seed=0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    labels = binary_labels(y.cpu(), ids[: args.loop_tasks]).to(device)
    train_head_single(x, labels[0], **{**common, "steps": 2})  # warm-up
    sync()
    t = time.perf_counter()
    for i in range(args.loop_tasks):
        train_head_single(x, labels[i], **common)
    sync()
    loop_s = time.perf_counter() - t

    t = time.perf_counter()
    train_heads(x.cpu(), y.cpu(), ids, n_checkpoints=1, save_every=1, progress=False, **common)
    sync()
    batched_s = time.perf_counter() - t

    loop_rate = args.loop_tasks * args.steps / loop_s
    batched_rate = len(ids) * args.steps / batched_s
    row = {"device": str(device), "dim": x.shape[1], "batch_size": args.batch_size, "steps": args.steps,
           "loop_tasks": args.loop_tasks, "batched_tasks": len(ids), "loop_s": loop_s, "batched_s": batched_s,
           "loop_task_steps_per_s": loop_rate, "batched_task_steps_per_s": batched_rate,
           "speedup": batched_rate / loop_rate,
           "full_zoo_200_steps_loop_min": 1022 * 200 / loop_rate / 60,
           "full_zoo_200_steps_batched_min": 1022 * 200 / batched_rate / 60}
    frame = pd.DataFrame([row])
    print(frame.T.to_string(header=False))
    write_csv_atomic(args.out, frame)
    write_json_atomic(os.path.splitext(args.out)[0] + ".json", {
        "args": vars(args), "torch": torch.__version__, "platform": platform.platform(),
        "processor": platform.processor(), "load_avg": os.getloadavg()})


if __name__ == "__main__":
    main()
