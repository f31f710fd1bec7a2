"""Roofline of the default profile's stages: achieved FLOP/s of each stage against the machine's measured peaks.

In one run, on the threads the stages get:
  * peaks: the matmul peak of float32 and (where the CPU has AMX or AVX512-BF16) bfloat16 (`torch.mm` of square
    matrices, best of a few sizes), the memory bandwidth (`torch.add` of large vectors: 2 reads + 1 write), and the
    time one tiny PyTorch op takes from Python (dispatch overhead);
  * per stage, with the project's own functions at the default profile's settings (`config/config.yaml`) on a
    short slice of work: the FLOPs of matmuls, convolutions and attention (`torch.utils.flop_counter
    .FlopCounterMode`, forward and backward), the bytes every (non-view) op reads and writes and the number of ops
    (a dispatch-mode counter; each op counted as if nothing stayed in cache, so an upper bound on the traffic),
    counted on one run; the wall time of another (median after a warm-up). Stages: backbone training (a few steps
    of the default backbone, bf16 autocast where the CPU has it, as the workflow), feature extraction (flip
    averaged, as the workflow), the zoo (head training on features), RPG training (a few steps of the default
    task-conditioned generator, `rpg.train.train_rpg`), generation (`sample_models`, DDIM as configured) and
    test-set scoring of Table 1's CNN rows (`ImageEvaluator.accuracy`, one row per model).

Columns: `achieved_flop_s` = counted FLOPs / wall seconds; `fraction_of_peak` = achieved / the peak of the stage's
dtype; `intensity_flop_per_byte` = counted FLOPs / counted bytes (elementwise ops move bytes but count no FLOPs);
`machine_balance` = peak / bandwidth (the intensity below which the memory bounds a stage); `overhead_fraction` =
ops x seconds per tiny op / wall (the share of the time Python and the dispatcher alone would take). The docs view
`roofline` names the bound of each stage under 40 % of its peak from these columns.

    OMP_NUM_THREADS=2 flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_roofline.py     # about a minute
Writes results/benchmarks/roofline.csv (+ .json, + lscpu.txt); `rpg docs update roofline results/benchmarks/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import ROOT, cpu_flags, median_seconds, set_threads, write_lscpu, write_results  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, nargs="+", default=[ROOT / "config" / "config.yaml"],
                   help="the profile measured (later files override earlier ones)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, OMP_NUM_THREADS)")
    p.add_argument("--backbone-steps", type=int, default=2, help="backbone training steps (batch of the profile)")
    p.add_argument("--images", type=int, default=2000, help="images of feature extraction and of test scoring")
    p.add_argument("--zoo-tasks", type=int, default=64, help="tasks of the zoo stage")
    p.add_argument("--zoo-steps", type=int, default=20, help="head training steps of the zoo stage")
    p.add_argument("--rpg-steps", type=int, default=3, help="RPG training steps")
    p.add_argument("--samples", type=int, default=2, help="models generated in the generation stage")
    p.add_argument("--table1", nargs="+", default=["cnn_s", "cnn_m", "cnn_1m"],
                   help="Table 1 rows whose test-set scoring is measured")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per stage (median), after one warm-up")
    add_peak_sizes_argument(p)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "roofline.csv")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- counting
class ByteCounter(TorchDispatchMode):
    """Bytes read and written by every op that is not a view (inputs + outputs, as if nothing stayed in cache),
    and the number of those ops."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            tensors = [t for t in tree_flatten((args, kwargs or {}, out))[0] if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            self.ops += 1
        return out


def count(fn: Callable[[], Any]) -> tuple[int, int, int]:
    """(FLOPs, bytes, ops) of one run of fn."""
    bytes_counter = ByteCounter()
    with FlopCounterMode(display=False) as flops, bytes_counter:
        fn()
    return flops.get_total_flops(), bytes_counter.bytes, bytes_counter.ops


# ------------------------------------------------------------------------------------------------------- peaks
PEAK_SIZES = (1024, 2048, 3072)


def add_peak_sizes_argument(p: argparse.ArgumentParser) -> None:
    """`--peak-sizes`: the matrices of `matmul_peak` (the tests' smoke runs pass small ones)."""
    p.add_argument("--peak-sizes", type=int, nargs="+", default=list(PEAK_SIZES),
                   help="sizes n of the square n x n matrices whose best torch.mm FLOP/s is the measured peak")


def matmul_peak(dtype: torch.dtype, sizes: Sequence[int] = PEAK_SIZES, repeats: int = 3) -> float:
    """Best FLOP/s of `torch.mm` on square matrices of `dtype`."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def memory_bandwidth(n: int = 32 * 2**20, repeats: int = 5) -> float:
    """Best bytes/s of `torch.add(a, b, out=c)` on float32 vectors of `n` elements (12 bytes per element)."""
    a, b, c = torch.rand(n), torch.rand(n), torch.empty(n)
    torch.add(a, b, out=c)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.add(a, b, out=c)
        best = max(best, 12 * n / (time.perf_counter() - start))
    return best


def seconds_per_tiny_op(calls: int = 20000) -> float:
    """Seconds one op on a one-element tensor takes from Python: what every op costs beyond its work."""
    x = torch.ones(1)
    for _ in range(100):
        torch.add(x, x)
    start = time.perf_counter()
    for _ in range(calls):
        torch.add(x, x)
    return (time.perf_counter() - start) / calls


# ------------------------------------------------------------------------------------------------------ stages
def synthetic_cifar(n_train: int, n_test: int, seed: int = 0):
    """Random uint8 images with labels in CIFAR-10's layout (FLOPs and timings do not depend on the pixels)."""
    from rpg.data import Cifar10

    g = torch.Generator().manual_seed(seed)
    return Cifar10(torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (n_train,), generator=g),
                   torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (n_test,), generator=g))


def stages(cfg, args: argparse.Namespace, device: torch.device, work: Path) -> list[tuple[str, str, Callable]]:
    """(stage, dtype, fn) of every stage, built in order (later stages take earlier stages' outputs)."""
    from rpg.experiments.arch_study.study import arch_spec
    from rpg.experiments.task_zoo.backbone import extract_features, train_backbone
    from rpg.experiments.task_zoo.heads import HEAD_KEYS, initial_heads, train_heads
    from rpg.experiments.task_zoo.methods import condition
    from rpg.experiments.task_zoo.pipeline import configured_task_ids
    from rpg.generate import sample_models
    from rpg.model import RPG
    from rpg.tokenize import Tokenizer
    from rpg.train import train_rpg
    from rpg.vision.architectures import build_model
    from rpg.vision.evaluate import ImageEvaluator
    from rpg.vision.preprocess import resolve_amp

    bb = cfg.backbone
    bf16_backbone = resolve_amp(bb.amp, device)
    data = synthetic_cifar(bb.batch_size * args.backbone_steps, args.images, cfg.seed)
    out: list[tuple[str, str, Callable]] = []

    def backbone_training():
        return train_backbone(data, arch=bb.arch, feature_dim=bb.feature_dim, epochs=1, batch_size=bb.batch_size,
                              lr=bb.lr, weight_decay=bb.weight_decay, label_smoothing=bb.label_smoothing,
                              optimizer=bb.optimizer, momentum=bb.momentum, warmup=bb.warmup, translate=bb.translate,
                              flip=bb.flip, amp=bb.amp, seed=cfg.seed, device=str(device), progress=False,
                              evaluate=False)[0]

    out.append(("backbone training", "bf16" if bf16_backbone else "fp32", backbone_training))
    backbone = backbone_training()
    images = data.test_images

    def feature_extraction():
        return extract_features(backbone, images, device=str(device), flip_average=bb.flip_average, amp=bb.amp,
                                compile=bb.compile_features)  # as the features rule

    out.append(("feature extraction", "bf16" if bf16_backbone else "fp32", feature_extraction))
    features = feature_extraction()

    z = cfg.zoo
    task_ids = configured_task_ids(cfg)[: args.zoo_tasks]

    def zoo():
        return train_heads(features, data.test_labels, task_ids, steps=args.zoo_steps, batch_size=z.batch_size,
                           lr=z.lr, weight_decay=z.weight_decay, n_checkpoints=1, save_every=1, seed=cfg.seed,
                           task_chunk=z.task_chunk, init=z.init, progress=False)

    out.append(("zoo (head training)", "fp32", zoo))

    # The default task-conditioned generator on head checkpoints of the default feature width.
    heads = initial_heads(bb.feature_dim, cfg.seed, task_ids, init="per_task")
    state_dicts = [{k: heads[k][i] for k in HEAD_KEYS} for i in range(len(task_ids))]
    tokenizer = Tokenizer.fit(state_dicts, cfg.model.token_size)
    tokens = torch.stack([tokenizer.tokenize(sd) for sd in state_dicts])
    cond = condition(cfg, task_ids)
    train_cfg = dataclasses.replace(cfg.train, steps=args.rpg_steps, warmup_steps=1, eval_every=args.rpg_steps,
                                    save_every=args.rpg_steps)
    rpg_bf16 = resolve_amp(cfg.train.amp, device)  # rpg.train's and rpg.generate's autocast

    runs = iter(range(10**6))

    def rpg_training():  # a fresh folder per call: train_rpg resumes a finished run of the same settings
        return train_rpg(cfg.model, cfg.diffusion, train_cfg, tokenizer, tokens, work / f"rpg{next(runs)}", cond=cond,
                         seed=cfg.seed, device=device, progress=False)

    out.append(("RPG training", "bf16" if rpg_bf16 else "fp32", rpg_training))
    generator = RPG(cfg.model, tokenizer.layer_index, tokenizer.token_index).to(device).eval()
    bits = cond[: args.samples]

    def generation():
        return sample_models(generator, tokenizer, cfg.diffusion, len(bits), seed=cfg.seed, cond=bits,
                             mode=cfg.generate.mode, tokens_per_call=cfg.generate.tokens_per_call, amp=cfg.train.amp)

    out.append(("generation", "bf16" if rpg_bf16 else "fp32", generation))

    for name in args.table1:  # the evaluator of Table 1's test set (rpg.experiments.arch_study.study)
        spec = arch_spec(cfg, name)
        model = build_model(spec.arch, spec.model_kwargs).to(device)
        evaluator = ImageEvaluator(data.test_images, data.test_labels, img_size=spec.img_size, device=device)
        out.append((f"test-set scoring {name}", "fp32", lambda m=model, ev=evaluator: ev.accuracy(m)))
    return out


# -------------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    set_threads(args.threads)
    from rpg.allocator import keep_freed_memory
    from rpg.config import load_config

    cfg = load_config(args.config)
    keep_freed_memory(cfg.keep_freed_memory)  # as every workflow job (rpg.experiments.rules.run_rule);
    # bench_allocator.py compares the two settings
    device = torch.device("cpu")
    flags = cpu_flags()
    has_bf16 = bool({"amx_bf16", "avx512_bf16"} & flags)
    peaks = {"fp32": matmul_peak(torch.float32, args.peak_sizes)}
    if has_bf16:
        peaks["bf16"] = matmul_peak(torch.bfloat16, args.peak_sizes)
    bandwidth = memory_bandwidth()
    tiny_op = seconds_per_tiny_op()
    print(f"matmul peak: {', '.join(f'{k} {v / 1e9:.1f} GFLOP/s' for k, v in peaks.items())}; "
          f"bandwidth {bandwidth / 1e9:.1f} GB/s; tiny op {tiny_op * 1e6:.1f} us")
    rows: list[dict] = [{"stage": f"matmul peak {k}", "dtype": k, "achieved_flop_s": v, "peak_flop_s": v,
                         "fraction_of_peak": 1.0} for k, v in peaks.items()]
    rows.append({"stage": "memory bandwidth", "bandwidth_bytes_s": bandwidth})
    rows.append({"stage": "tiny op", "seconds_per_tiny_op": tiny_op})
    work = Path(tempfile.mkdtemp(prefix="roofline-"))
    try:
        for stage, dtype, fn in stages(cfg, args, device, work):
            seconds, cpu_seconds = median_seconds(fn, device, args.repeats)
            flops, nbytes, ops = count(fn)
            peak = peaks.get(dtype, peaks["fp32"])
            row = {"stage": stage, "dtype": dtype, "flops": flops, "bytes": nbytes, "ops": ops, "seconds": seconds,
                   "cpu_seconds": cpu_seconds, "achieved_flop_s": flops / seconds, "peak_flop_s": peak,
                   "fraction_of_peak": flops / seconds / peak, "intensity_flop_per_byte": flops / max(nbytes, 1),
                   "bandwidth_bytes_s": bandwidth, "machine_balance": peak / bandwidth,
                   "seconds_per_tiny_op": tiny_op, "overhead_fraction": ops * tiny_op / seconds}
            rows.append(row)
            print(f"{stage:28s} {dtype}  {flops / 1e9:9.2f} GFLOP  {seconds:7.2f} s  "
                  f"{row['achieved_flop_s'] / 1e9:8.2f} GFLOP/s  {100 * row['fraction_of_peak']:5.1f} % of peak  "
                  f"{row['intensity_flop_per_byte']:7.2f} FLOP/B  {ops} ops ({100 * row['overhead_fraction']:.0f} %)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config = {**vars(args), "config": [str(p) for p in args.config]}
    write_results(args.out, rows, config, device)
    write_lscpu(args.out)
    return rows


if __name__ == "__main__":
    main()
