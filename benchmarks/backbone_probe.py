"""Probe the CPU backbone: 10-class accuracy and binary-head accuracy on the paper's Table 11 tasks.

Trains the backbone (``rpg.experiments.task_zoo.backbone.train_backbone``) on real CIFAR-10, extracts flip-averaged features,
then trains the paper's head ``Linear(d,d) → SiLU → Linear(d,2,bias=False)`` for the 10 Table 11
embeddings at once (batched einsum; every task starts from the same seeded head, as in the zoo) with AdamW
on the cached train features, and reports per-task test accuracy, balanced accuracy and timings.

    python benchmarks/backbone_probe.py --data data --threads 2            # CPU, the default settings
    python benchmarks/backbone_probe.py --epochs 2 --max-train 10000       # quick comparison

Writes one JSON line per run to ``--out`` (default ``results/benchmarks/backbone_probe.jsonl``) holding the
settings and the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rpg.experiments.task_zoo.backbone import extract_features, train_backbone
from rpg.data import CIFAR10_CLASSES, load_cifar10

TABLE11 = (
    "0100010111 0111110110 0011101110 0101111111 0010000000 "
    "0001100101 1111101001 1010000011 0100010110 1100011001"
).split()


def task_targets(embeddings: list[str], labels: torch.Tensor) -> torch.Tensor:
    """Binary targets: bit i (from the left) of an embedding = class i is positive.

    Shapes:
        labels: (N,) int64 in 0..9 → (T, N) int64 in {0, 1}
    """
    bits = torch.tensor([[int(c) for c in e] for e in embeddings])  # (T, 10)
    return bits[:, labels]  # (T, N)


def train_heads(
    train_x: torch.Tensor, train_y: torch.Tensor, *, steps: int, batch_size: int, lr: float,
    weight_decay: float, seed: int,
) -> dict[str, torch.Tensor]:
    """Train T heads ``Linear(d,d) → SiLU → Linear(d,2,bias=False)`` in one batched computation.

    All heads start from the same initial head (seeded ``nn.Linear`` init) and see the same mini-batches.

    Shapes:
        train_x: (N, d) float32; train_y: (T, N) int64 → {"w1": (T, d, d), "b1": (T, d), "w2": (T, 2, d)}
    """
    t, d = train_y.shape[0], train_x.shape[1]
    torch.manual_seed(seed)
    fc1, fc2 = torch.nn.Linear(d, d), torch.nn.Linear(d, 2, bias=False)
    params = {
        "w1": fc1.weight.detach().expand(t, d, d).clone().requires_grad_(),  # (T, d_out, d_in)
        "b1": fc1.bias.detach().expand(t, d).clone().requires_grad_(),  # (T, d)
        "w2": fc2.weight.detach().expand(t, 2, d).clone().requires_grad_(),  # (T, 2, d)
    }
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(train_x), (batch_size,), generator=gen)
        logits = head_logits(params, train_x[idx])  # (T, B, 2)
        # Sum over tasks of each task's mean loss: every head gets exactly its own gradient.
        loss = F.cross_entropy(logits.flatten(0, 1), train_y[:, idx].flatten(), reduction="sum") / batch_size
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


def head_logits(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Shapes: x (N, d) → logits (T, N, 2)."""
    h = F.silu(torch.einsum("nd,ted->tne", x, params["w1"]) + params["b1"][:, None, :])  # (T, N, d)
    return torch.einsum("tne,tke->tnk", h, params["w2"])  # (T, N, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data")
    p.add_argument("--arch", default="rpg_cifar_cnn")
    p.add_argument("--feature-dim", type=int, default=128)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.4)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.2)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--warmup", type=float, default=0.2)
    p.add_argument("--translate", type=int, default=2)
    p.add_argument("--amp", default="auto")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--no-flip-average", action="store_true", help="features without test-time flip averaging")
    p.add_argument("--model-kwargs", default="{}", help='JSON, e.g. \'{"widths": [64,128,256], "pool": "avg"}\'')
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--head-steps", type=int, default=300)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--head-wd", type=float, default=0.0)
    p.add_argument("--head-batch", type=int, default=500)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="results/benchmarks/backbone_probe.jsonl")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    data = load_cifar10(args.data)
    t_load = time.perf_counter() - t0
    model, metrics = train_backbone(
        data, arch=args.arch, feature_dim=args.feature_dim, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, seed=args.seed,
        device=args.device, progress=not args.no_progress, optimizer=args.optimizer, warmup=args.warmup,
        translate=args.translate, amp=args.amp, channels_last=not args.no_channels_last,
        max_train=args.max_train, model_kwargs=json.loads(args.model_kwargs),
    )
    print(f"10-class test accuracy {metrics['test_accuracy']:.4f}  ({metrics['train_seconds']:.1f} s, "
          f"{metrics['n_params']} params, amp={metrics['amp']}, "
          f"losses {[round(x, 3) for x in metrics['epoch_losses']]})")

    t1 = time.perf_counter()
    feat_kw = dict(device=args.device, flip_average=not args.no_flip_average, amp=args.amp,
                   channels_last=not args.no_channels_last)
    train_x = extract_features(model, data.train_images, **feat_kw)  # (50000, d)
    test_x = extract_features(model, data.test_images, **feat_kw)  # (10000, d)
    t_feat = time.perf_counter() - t1

    t2 = time.perf_counter()
    train_y, test_y = task_targets(TABLE11, data.train_labels), task_targets(TABLE11, data.test_labels)
    heads = train_heads(train_x, train_y, steps=args.head_steps, batch_size=args.head_batch, lr=args.head_lr,
                        weight_decay=args.head_wd, seed=args.seed)
    with torch.no_grad():
        pred = head_logits(heads, test_x).argmax(-1)  # (T, N)
    t_head = time.perf_counter() - t2
    correct = (pred == test_y).float()
    acc = correct.mean(1)  # (T,)
    pos = test_y.bool()
    bal = 0.5 * ((correct * pos).sum(1) / pos.sum(1) + (correct * ~pos).sum(1) / (~pos).sum(1))  # (T,)

    print(f"features: {t_feat:.1f} s (d={train_x.shape[1]}, mean |x| {train_x.abs().mean():.3f}); "
          f"heads: {t_head:.1f} s")
    for e, a, b in zip(TABLE11, acc.tolist(), bal.tolist()):
        names = ",".join(c for c, bit in zip(CIFAR10_CLASSES, e) if bit == "1")
        print(f"  {e}  acc {100 * a:5.1f}  balanced {100 * b:5.1f}  ({names})")
    print(f"Table 11 mean binary accuracy {100 * acc.mean():.2f}  (balanced {100 * bal.mean():.2f})")

    record = {
        "tag": args.tag, "settings": vars(args), "test_accuracy_10class": metrics["test_accuracy"],
        "table11_acc": acc.tolist(), "table11_balanced": bal.tolist(), "table11_mean": acc.mean().item(),
        "table11_balanced_mean": bal.mean().item(), "train_seconds": metrics["train_seconds"],
        "feature_seconds": t_feat, "head_seconds": t_head, "load_seconds": t_load,
        "epoch_losses": metrics["epoch_losses"], "n_params": metrics["n_params"], "amp": metrics["amp"],
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
