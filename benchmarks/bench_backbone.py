"""Backbone training speed: memory format, bf16 autocast, torch.compile and the data path, side by side in one run.

Every model variant trains a fresh `rpg_cifar_cnn` (same seed, same initial weights) for the same `--steps` SGD
steps on the same pre-augmented batches of real CIFAR-10 images, exactly as `rpg.vision.training.train_classifier`
does one step (forward, cross-entropy with label smoothing, backward, SGD-Nesterov). Variants: the layout
(`contiguous` / `channels_last`) × the precision (`fp32`, and `bf16` autocast where the CPU has AMX / AVX512-BF16)
× eager or `torch.compile` (inductor on CPU; channels-last only, the faster eager layout). The first step of each
variant is timed on its own (for a compiled model it holds the compilation, counted as `first_step_s`); the
remaining steps run round-robin (one step of every variant in turn, so a drift in the shared machine's load hits all
alike) and their median is `step_s` (wall) and `step_cpu_s` (this process's CPU time, which does not count waiting
for a core).
`ratio_fp32` is the speed-up over the contiguous fp32 eager baseline (what a machine without bf16 compares),
`ratio_default` over the project's current default (channels-last, bf16 where the CPU has it, eager). The loss
after the last step and its difference to the same precision's eager run show whether a variant trains the same.

The data path is measured on its own, per batch: the project's augmentation on uint8 tensors in batches
(`rpg.vision.preprocess.augment` + `Preprocess`) vs. the usual per-image torchvision pipeline on PIL images
(RandomCrop with reflect padding + RandomHorizontalFlip + ToTensor + Normalize), as a fraction of a training step.
Last, the forward pass of 1,000 images in eval mode (what feature extraction and test scoring run): eager vs.
compiled with inductor's freezing (constant weights, BatchNorm folded), per precision.

    OMP_NUM_THREADS=2 flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_backbone.py --data data   # ~5 min
    .venv/bin/python benchmarks/bench_backbone.py --data data --steps 3 --no-compile                   # quick look
Writes results/benchmarks/backbone_speed.csv (+ .json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import set_threads, write_results  # noqa: E402

import rpg.vision.cifar_cnn  # noqa: E402,F401  (registers rpg_* with timm)
from rpg.allocator import keep_freed_memory  # noqa: E402
from rpg.config import BackboneConfig, Config  # noqa: E402
from rpg.data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10  # noqa: E402
from rpg.vision.preprocess import Preprocess, augment, resolve_amp  # noqa: E402
from rpg.vision.training import make_optimizer  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data", help="folder with cifar-10-python.tar.gz")
    p.add_argument("--arch", default=BackboneConfig.arch)
    p.add_argument("--steps", type=int, default=8, help="training steps per variant (the first holds any compile)")
    p.add_argument("--batch-size", type=int, default=BackboneConfig.batch_size)
    p.add_argument("--data-batches", type=int, default=5, help="batches timed per data path")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/benchmarks/backbone_speed.csv"))
    return p.parse_args(argv)


def _pil_batch(images: torch.Tensor, translate: int, gen: torch.Generator) -> torch.Tensor:
    """The per-image torchvision pipeline on PIL images (what `augment` + `Preprocess` replace)."""
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose([T.RandomCrop(32, padding=translate, padding_mode="reflect"), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([tf(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in images])


def time_data_paths(images: torch.Tensor, batch_size: int, n_batches: int, seed: int) -> list[dict]:
    """Seconds per batch of the batched-tensor and the per-image PIL augmentation + normalisation."""
    prepare = Preprocess(channels_last=True)
    paths = {
        "tensor_batched": lambda x, g: prepare(augment(x, BackboneConfig.translate, BackboneConfig.flip, g)),
        "pil_per_image": lambda x, g: _pil_batch(x, BackboneConfig.translate, g),
    }
    rows = []
    for name, fn in paths.items():
        gen = torch.Generator().manual_seed(seed)
        times = []
        for i in range(n_batches):
            x = images[i * batch_size:(i + 1) * batch_size]
            t0 = time.perf_counter()
            fn(x, gen)
            times.append(time.perf_counter() - t0)
        rows.append({"kind": "data", "variant": name, "step_s": statistics.median(times)})
    return rows


class _Variant:
    """One model variant: a fresh model (same seed, so the same initial weights), its optimizer and its step."""

    def __init__(self, arch: str, layout: str, precision: str, compiled: bool, seed: int) -> None:
        import timm

        self.layout, self.precision, self.compiled = layout, precision, compiled
        self.name = f"{layout}/{precision}/{'compile' if compiled else 'eager'}"
        torch.manual_seed(seed)
        self.model = timm.create_model(arch, num_classes=10, feature_dim=BackboneConfig.feature_dim)
        if layout == "channels_last":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.opt = make_optimizer(self.model, BackboneConfig.optimizer, BackboneConfig.lr * 0.1,
                                  BackboneConfig.weight_decay, momentum=BackboneConfig.momentum)
        self.run = torch.compile(self.model) if compiled else self.model
        self.prepare = Preprocess(channels_last=layout == "channels_last")
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.loss = float("nan")

    def step(self, batch: torch.Tensor, labels: torch.Tensor) -> None:
        """One training step as `train_classifier` does it, timed (wall and process CPU seconds)."""
        t0, c0 = time.perf_counter(), time.process_time()
        x = self.prepare(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = self.run(x)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=BackboneConfig.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.wall.append(time.perf_counter() - t0)
        self.cpu.append(time.process_time() - c0)
        self.loss = loss.item()

    def row(self) -> dict:
        return {"kind": "train_step", "variant": self.name, "layout": self.layout, "precision": self.precision,
                "compiled": self.compiled, "first_step_s": self.wall[0], "step_s": statistics.median(self.wall[1:]),
                "step_cpu_s": statistics.median(self.cpu[1:]), "final_loss": self.loss}


def time_training(images: torch.Tensor, labels: torch.Tensor, variants: list[_Variant], steps: int,
                  batch_size: int, seed: int) -> None:
    """`steps` steps of every variant on the same augmented batches, round-robin (one step of each in turn), so
    that a drift in the machine's load hits every variant alike; the first step (compilation) runs alone first."""
    gen = torch.Generator().manual_seed(seed)
    batches = [augment(images[s * batch_size:(s + 1) * batch_size], BackboneConfig.translate, BackboneConfig.flip,
                       gen) for s in range(steps)]
    targets = [labels[s * batch_size:(s + 1) * batch_size] for s in range(steps)]
    for v in variants:
        v.step(batches[0], targets[0])
        print(f"{v.name:<32} first step {v.wall[0]:6.2f} s", flush=True)
    for s in range(1, steps):
        for v in variants:
            v.step(batches[s], targets[s])


@torch.no_grad()
def time_inference(images: torch.Tensor, arch: str, precisions: list[str], compile_too: bool, repeats: int,
                   batch_size: int = 1000) -> list[dict]:
    """Forward passes of the backbone in eval mode on `batch_size` images, as feature extraction and
    test scoring run it: eager, and compiled with inductor's freezing (weights constant: BN folded into the convs)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10, feature_dim=BackboneConfig.feature_dim).eval()
    model = model.to(memory_format=torch.channels_last)
    x = Preprocess(channels_last=True)(images[:batch_size])
    rows, ref = [], {}
    for compiled in [False] + ([True] if compile_too else []):
        for precision in precisions:
            torch._dynamo.reset()
            torch._inductor.config.freezing = compiled
            run = torch.compile(model) if compiled else model
            times, out = [], None
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = run(x).float()
                times.append(time.perf_counter() - t0)
            ref.setdefault(precision, out)
            rows.append({"kind": "inference", "variant": f"channels_last/{precision}/"
                         f"{'compile+freezing' if compiled else 'eager'}", "precision": precision,
                         "compiled": compiled, "first_step_s": times[0], "step_s": statistics.median(times[1:]),
                         "max_abs_diff_to_eager": float((out - ref[precision]).abs().max())})
    torch._inductor.config.freezing = False
    base = {r["precision"]: r["step_s"] for r in rows if not r["compiled"]}
    for r in rows:
        r |= {"ratio_to_eager": base[r["precision"]] / r["step_s"], "ratio_fp32": base["fp32"] / r["step_s"]}
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    set_threads(args.threads)
    keep_freed_memory(Config().keep_freed_memory)  # as every workflow job under the default config (run_rule)
    data = load_cifar10(args.data)
    n = (args.steps + 1) * args.batch_size
    images, labels = data.train_images[:max(n, args.data_batches * args.batch_size)], data.train_labels
    has_bf16 = resolve_amp("auto", "cpu")
    precisions = ["fp32", "bf16"] if has_bf16 else ["fp32"]
    layouts = {False: ("contiguous", "channels_last"), True: ("channels_last",)}  # compiled: the faster layout only
    variants = [_Variant(args.arch, layout, precision, compiled, args.seed)
                for compiled in [False] + ([] if args.no_compile else [True])
                for precision in precisions for layout in layouts[compiled]]
    time_training(images, labels, variants, args.steps, args.batch_size, args.seed)
    rows: list[dict] = [v.row() for v in variants]
    train = {r["variant"]: r for r in rows}
    base = train["contiguous/fp32/eager"]["step_s"]
    default = train[f"channels_last/{'bf16' if has_bf16 else 'fp32'}/eager"]["step_s"]
    base_cpu = train["contiguous/fp32/eager"]["step_cpu_s"]
    for r in rows:
        eager = train[f"{r['layout']}/{r['precision']}/eager"]
        r |= {"ratio_fp32": base / r["step_s"], "ratio_default": default / r["step_s"],
              "ratio_fp32_cpu": base_cpu / r["step_cpu_s"],
              "loss_diff_to_eager": r["final_loss"] - eager["final_loss"]}
    data_rows = time_data_paths(images, args.batch_size, args.data_batches, args.seed)
    for r in data_rows:
        r |= {"fraction_of_default_step": r["step_s"] / default,
              "ratio_to_tensor": r["step_s"] / data_rows[0]["step_s"]}
    rows += data_rows
    inference_rows = time_inference(images, args.arch, precisions, not args.no_compile, repeats=3)
    rows += inference_rows

    print(f"\n{'variant':<32} {'step s':>7} {'cpu s':>7} {'first s':>8} {'vs fp32':>8} {'(cpu)':>7} "
          f"{'vs default':>10} {'loss diff':>10}")
    for r in rows:
        if r["kind"] == "train_step":
            print(f"{r['variant']:<32} {r['step_s']:7.3f} {r['step_cpu_s']:7.3f} {r['first_step_s']:8.2f} "
                  f"{r['ratio_fp32']:7.2f}x {r['ratio_fp32_cpu']:6.2f}x "
                  f"{r['ratio_default']:9.2f}x {r['loss_diff_to_eager']:10.2e}")
    for r in data_rows:
        print(f"data {r['variant']:<27} {r['step_s']:7.3f} s/batch = {r['fraction_of_default_step']:.1%} of a default "
              f"step, {r['ratio_to_tensor']:.1f}x the tensor path")
    for r in inference_rows:
        print(f"forward of 1000 images {r['variant']:<32} {r['step_s']:7.3f} s (first {r['first_step_s']:.1f} s), "
              f"{r['ratio_to_eager']:.2f}x eager, {r['ratio_fp32']:.2f}x fp32 eager, "
              f"max |diff| {r['max_abs_diff_to_eager']:.1e}")
    write_results(args.out, rows, {k: v for k, v in vars(args).items()}, "cpu")
    return rows


if __name__ == "__main__":
    main()
