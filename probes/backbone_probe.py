"""Probe a CPU backbone recipe: 10-class accuracy and the zoo's binary-head accuracy on seen tasks.

Protocol (no choice may use an unseen task): the backbone (``rpg.experiments.task_zoo.backbone.train_backbone``)
trains on the training images minus the 5,000 held-out validation images (``rpg.data.split_train_val``, as the
workflow does); the zoo's heads (``rpg.experiments.task_zoo.heads.train_heads``, one shared initial head) train on
its flip-averaged features for 10 seeded tasks of the *training split* and are scored on the *validation images*.
The 10-class test accuracy is printed for reference only.

    python probes/backbone_probe.py --data data --threads 2            # CPU, the default settings
    python probes/backbone_probe.py --epochs 2 --max-train 10000       # quick comparison

Writes one JSON line per run to ``--out`` (default ``results/probes/backbone_probe.jsonl``) holding the
settings and the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import random

import torch

from rpg.config import config_from_dict
from rpg.data import load_cifar10, split_train_val
from rpg.experiments.task_zoo.backbone import extract_features, train_backbone
from rpg.experiments.task_zoo.heads import predict, task_metrics, train_heads
from rpg.experiments.task_zoo.tasks import ALL_TASK_IDS, id_to_embedding, make_split, positive_classes

PROBE_TASKS = 10  # seen tasks scored per recipe


def probe_tasks(n: int, seed: int) -> list[int]:
    """`n` seeded tasks from the training split of the default config: never an unseen (or RPG-validation) task,
    so choosing a backbone recipe with this probe cannot tune on the tasks the tables report."""
    cfg = config_from_dict({})
    split = make_split(ALL_TASK_IDS, cfg.tasks.unseen, cfg.tasks.n_val, cfg.seed)
    return sorted(random.Random(seed).sample(split.train, n))


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
    p.add_argument("--stem-init", default="random", choices=["random", "whiten"])
    p.add_argument("--lookahead", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--no-flip-average", action="store_true", help="features without test-time flip averaging")
    p.add_argument("--model-kwargs", default="{}", help='JSON, e.g. \'{"widths": [64,128,256], "pool": "avg"}\'')
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-images", type=int, default=5000, help="held-out training images (data.val_images)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--head-steps", type=int, default=300)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--head-wd", type=float, default=0.0)
    p.add_argument("--head-batch", type=int, default=500)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="results/probes/backbone_probe.jsonl")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    data = load_cifar10(args.data)
    train_idx, val_idx = split_train_val(data, args.val_images, args.seed)
    t_load = time.perf_counter() - t0
    model, metrics = train_backbone(
        data, arch=args.arch, feature_dim=args.feature_dim, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, seed=args.seed,
        device=args.device, progress=not args.no_progress, optimizer=args.optimizer, warmup=args.warmup,
        translate=args.translate, amp=args.amp, stem_init=args.stem_init,
        lookahead=args.lookahead, channels_last=not args.no_channels_last,
        max_train=args.max_train, model_kwargs=json.loads(args.model_kwargs), train_indices=train_idx,
    )
    print(f"10-class test accuracy {metrics['test_accuracy']:.4f}  ({metrics['train_seconds']:.1f} s, "
          f"{metrics['n_params']} params, amp={metrics['amp']}, "
          f"losses {[round(x, 3) for x in metrics['epoch_losses']]})")

    t1 = time.perf_counter()
    feat_kw = dict(device=args.device, flip_average=not args.no_flip_average, amp=args.amp,
                   channels_last=not args.no_channels_last)
    train_x = extract_features(model, data.train_images[train_idx], **feat_kw)  # (45000, d)
    val_x = extract_features(model, data.train_images[val_idx], **feat_kw)  # (5000, d)
    t_feat = time.perf_counter() - t1

    t2 = time.perf_counter()
    tasks = probe_tasks(PROBE_TASKS, args.seed)
    stacked = train_heads(train_x, data.train_labels[train_idx], tasks, steps=args.head_steps,
                          batch_size=args.head_batch, lr=args.head_lr, weight_decay=args.head_wd, n_checkpoints=1,
                          save_every=1, seed=args.seed, progress=False)
    heads = {k: v[:, -1] for k, v in stacked.items()}  # the last checkpoint of each task
    m = task_metrics(predict(heads, val_x), data.train_labels[val_idx], tasks)
    acc, bal = m["accuracy"], m["balanced_accuracy"]
    t_head = time.perf_counter() - t2

    print(f"features: {t_feat:.1f} s (d={train_x.shape[1]}, mean |x| {train_x.abs().mean():.3f}); "
          f"heads: {t_head:.1f} s")
    for t, a, b in zip(tasks, acc.tolist(), bal.tolist()):
        emb = id_to_embedding(t)
        print(f"  {emb}  val acc {100 * a:5.1f}  balanced {100 * b:5.1f}  ({','.join(positive_classes(emb))})")
    print(f"seen-task mean binary accuracy on the validation images {100 * acc.mean():.2f} "
          f"(balanced {100 * bal.mean():.2f})")

    record = {
        "tag": args.tag, "settings": vars(args), "test_accuracy_10class": metrics["test_accuracy"],
        "probe_tasks": tasks, "val_acc": acc.tolist(), "val_balanced": bal.tolist(), "val_mean": acc.mean().item(),
        "val_balanced_mean": bal.mean().item(), "train_seconds": metrics["train_seconds"],
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
