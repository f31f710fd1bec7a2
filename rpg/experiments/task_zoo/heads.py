"""The classifier zoo: one binary head per task, all trained at once from one shared initial head.

(`zoo.init: per_task` starts each task from its own seeded head instead: the study of regimes, issue 13.)

The head is the paper's `Linear(d, d) -> SiLU -> Linear(d, 2, bias=False)` on frozen backbone features. Every task
starts from the *same* initial head (identical initialisation is what makes heads of similar tasks land close
together). All tasks see the same feature rows at each step (only their labels differ), so the whole zoo is one
vectorised computation over stacked parameters (T, ...). AdamW is element-wise, hence this is exactly T independent
trainings; `train_head_single` is the one-task-at-a-time reference used by the tests and the benchmark.

On disk the zoo is a dataset of safetensors state dicts, `checkpoints/<task id:04d>_<k>.safetensors`, with the task
embedding, positive classes and test accuracy as metadata, plus `index.csv`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rpg.config import ZooConfig
from rpg.experiments.task_zoo.tasks import binary_labels, id_to_embedding, positive_classes
from rpg.utils import CheckpointError, load_safetensors, save_safetensors_atomic, write_csv_atomic

HEAD_KEYS = ("0.weight", "0.bias", "2.weight")


def make_head(d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 2, bias=False))


def initial_head(d: int, seed: int) -> dict[str, torch.Tensor]:
    """The shared initial head (PyTorch's default Linear init under `seed`)."""
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in make_head(d).state_dict().items()}


INITS = ("shared", "per_task")
# Seed of task t's own initial head (zoo.init = per_task): (seed + 1) * PER_TASK_SEED_STRIDE + t. It depends on the
# task id only (not on which other tasks are configured) and never equals the shared head's `seed`.
PER_TASK_SEED_STRIDE = 1_000_003


def initial_heads(d: int, seed: int, task_ids: Sequence[int], init: str = ZooConfig.init) -> dict[str, torch.Tensor]:
    """Stacked initial heads {key: (T, ...)}: one shared head repeated (`shared`, the paper's recipe), or each task's
    head from its own seeded init (`per_task`: heads of similar tasks then share no basin)."""
    if init == "shared":
        head = initial_head(d, seed)
        return {k: v[None].repeat(len(task_ids), *[1] * v.ndim) for k, v in head.items()}
    if init != "per_task":
        raise ValueError(f"unknown zoo init '{init}' (expected one of {', '.join(INITS)})")
    heads = [initial_head(d, (seed + 1) * PER_TASK_SEED_STRIDE + int(t)) for t in task_ids]
    return {k: torch.stack([h[k] for h in heads]) for k in HEAD_KEYS}


def head_logits(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Stacked heads on shared inputs.

    Shapes: params '0.weight' (T, d, d), '0.bias' (T, d), '2.weight' (T, 2, d); x (B, d) -> logits (T, B, 2).
    """
    h = torch.einsum("bd,tkd->tbk", x, params["0.weight"]) + params["0.bias"][:, None, :]  # (T, B, d)
    return torch.einsum("tbk,tck->tbc", F.silu(h), params["2.weight"])  # (T, B, 2)


def save_steps(steps: int, n_checkpoints: int, save_every: int) -> list[int]:
    first = steps - (n_checkpoints - 1) * save_every
    if first < 1:
        raise ValueError(f"{n_checkpoints} checkpoints every {save_every} steps need more than {steps} steps")
    return [first + i * save_every for i in range(n_checkpoints)]


def _head_grads(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, y: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the summed per-task mean cross-entropy of t stacked heads, by hand (no autograd).

    All heads see the same rows `x`, so the first layer of every head is ONE matrix product x @ [W_1; ...; W_t]^T
    and its weight gradient one product dH^T @ x. With two classes, softmax cross-entropy depends only on the logit
    difference z = l1 - l0: dL/dl1 = sigmoid(z) - y = -dL/dl0 (the same maths as `train_head_single`, rounded
    differently). Shapes: w1 (t, d, d), b1 (t, d), w2 (t, 2, d), x (B, d), y (B, t) float 0/1.
    Returns: grad w1, grad b1, grad w2 (shapes of the parameters) and the per-position logit differences z (B, t).
    """
    t, d, _ = w1.shape
    b = x.shape[0]
    h = torch.addmm(b1.reshape(1, t * d), x, w1.reshape(t * d, d).T)  # (B, t*d) pre-activations
    s = torch.sigmoid(h)
    a = h * s  # SiLU
    a3 = a.view(b, t, d)
    w_diff = w2[:, 1] - w2[:, 0]  # (t, d)
    z = (a3 * w_diff).sum(-1)  # (B, t)
    g = (torch.sigmoid(z) - y) / b  # dL/dl1 (B, t)
    g_w2 = (a3 * g.unsqueeze(-1)).sum(0)  # (t, d)
    dh = torch.sub(h, a).add_(1).mul_(s)  # SiLU'(h) = s * (1 + h * (1 - s)) = s * (1 + h - a)
    dh3 = dh.view(b, t, d).mul_(g.unsqueeze(-1) * w_diff)
    return (dh.T @ x).view(t, d, d), dh3.sum(0), torch.stack([-g_w2, g_w2], dim=1), z


def train_heads(features: torch.Tensor, class_labels: torch.Tensor, task_ids: Sequence[int], *, steps: int,
                batch_size: int, lr: float, weight_decay: float, n_checkpoints: int | None = None,
                save_every: int | None = None, seed: int, task_chunk: int = ZooConfig.task_chunk,
                init: str = ZooConfig.init, progress: bool = True,
                on_step: Callable[[int, float], None] | None = None, start: dict[str, torch.Tensor] | None = None,
                save_at: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Train one head per task, vectorised over tasks.

    Each step gathers the shared minibatch once, computes the gradients of blocks of `task_chunk` tasks by hand
    (`_head_grads`: one GEMM per layer and block), then takes one fused AdamW step over all stacked heads. Blocks
    only bound the size of the intermediate (batch_size, task_chunk * d) tensors; results do not depend on them.
    Measured on one CPU core (benchmarks/bench_zoo.py, d = 128, batch 500): blocks of 4-16 tasks (a few MB, about
    the L2 cache) ran ~2.3x the one-task loop, all 1022 tasks in one block 0.9x (memory-bound). A GPU wants large
    blocks (e.g. all tasks).

    Args:
        features: (N, d) cached training features; class_labels: (N,) CIFAR-10 classes.
        init: "shared" (every task from one initial head) or "per_task" (each from its own; `initial_heads`).
        on_step: called every 10 steps (and at the last) with the step and the mean loss over tasks.
        start: stacked heads {key: (T, ...)} to start from instead of `init` (fine-tuning given heads:
            `rpg.experiments.task_zoo.finetune_few`); `seed` then sets the minibatches only.
        save_at: the steps whose heads are returned (0 = the start); default the last `n_checkpoints` steps,
            `save_every` apart.
    Returns:
        stacked checkpoints {key: (T, K, ...)}, K = len(save_at) or n_checkpoints.
    """
    d = features.shape[1]
    n_tasks = len(task_ids)
    start = initial_heads(d, seed, task_ids, init) if start is None else start  # {key: (T, ...)}
    save_at = save_steps(steps, n_checkpoints, save_every) if save_at is None else sorted(set(save_at))
    n_checkpoints = len(save_at)
    labels = binary_labels(class_labels, task_ids).T.to(features.device, features.dtype).contiguous()  # (N, T)
    # One shared sequence of minibatches for every task.
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randint(0, features.shape[0], (batch_size,), generator=gen) for _ in range(steps)]
    blocks = [slice(i, min(i + task_chunk, n_tasks)) for i in range(0, n_tasks, task_chunk)]
    params = [start[k].to(features.device, copy=True).contiguous() for k in HEAD_KEYS]  # never the caller's
    for p in params:
        p.grad = torch.empty_like(p)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=features.device.type in ("cpu", "cuda"))
    out = {k: torch.empty(n_tasks, n_checkpoints, *start[k].shape[1:]) for k in HEAD_KEYS}
    if 0 in save_at:
        for k in HEAD_KEYS:
            out[k][:, 0] = start[k]
    bar = tqdm(total=steps, desc=f"zoo: {n_tasks} heads", disable=not progress, dynamic_ncols=True)
    for step in range(1, steps + 1):
        idx = batches[step - 1].to(features.device)
        x, y = features[idx], labels[idx]  # (B, d), (B, T)
        log = on_step is not None and (step % 10 == 0 or step == steps)
        loss = 0.0
        for rows in blocks:
            *grads, z = _head_grads(*(p[rows] for p in params), x, y[:, rows])
            for p, g in zip(params, grads):
                p.grad[rows] = g
            if log:  # cross-entropy from the logit difference: softplus(z) - y * z
                loss += float((F.softplus(z) - y[:, rows] * z).mean(0).sum())
        opt.step()
        if step in save_at:
            j = save_at.index(step)
            for k, p in zip(HEAD_KEYS, params):
                out[k][:, j] = p.detach().cpu()
        if log:
            on_step(step, loss / n_tasks)
        bar.update(1)
    bar.close()
    return out


def train_head_single(features: torch.Tensor, labels: torch.Tensor, *, steps: int, batch_size: int, lr: float,
                      weight_decay: float, seed: int, init_state: dict[str, torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
    """One task at a time with an nn.Module (the reference for `train_heads`; same init, batches and maths).

    init_state: the head to start from (default: the shared initial head under `seed`).
    """
    d = features.shape[1]
    head = make_head(d)
    head.load_state_dict(initial_head(d, seed) if init_state is None else init_state)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        idx = torch.randint(0, features.shape[0], (batch_size,), generator=gen)
        loss = F.cross_entropy(head(features[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(params: dict[str, torch.Tensor], features: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Predicted binary labels of stacked heads. Shapes: params (T, ...), features (N, d) -> (T, N) long."""
    n_heads = params["0.weight"].shape[0]
    preds = []
    for i in range(0, n_heads, chunk):
        sub = {k: v[i : i + chunk].float() for k, v in params.items()}
        preds.append(head_logits(sub, features).argmax(-1))
    return torch.cat(preds)


def binary_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Accuracy and balanced accuracy (mean of the two class recalls). Shapes: (T, N) each -> (T,) each."""
    correct = (pred == target).float()
    pos = target == 1
    recall_pos = (correct * pos).sum(1) / pos.sum(1).clamp_min(1)
    recall_neg = (correct * ~pos).sum(1) / (~pos).sum(1).clamp_min(1)
    return {"accuracy": correct.mean(1), "balanced_accuracy": 0.5 * (recall_pos + recall_neg)}


def task_metrics(pred: torch.Tensor, class_labels: torch.Tensor, task_ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """Metrics of prediction row i on task task_ids[i]: accuracy, balanced accuracy (T,), per_class (T, 10).

    per_class[:, c] is the accuracy on the images of CIFAR-10 class c.
    """
    target = binary_labels(class_labels, task_ids)  # (T, N)
    correct = (pred == target).float()
    per_class = torch.stack([correct[:, class_labels == c].mean(1) for c in range(10)], dim=1)
    return {**binary_metrics(pred, target), "per_class": per_class}


def evaluate_heads(params: dict[str, torch.Tensor], task_ids: Sequence[int], features: torch.Tensor,
                   class_labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metrics of stacked head i on task task_ids[i] (see `task_metrics`)."""
    return task_metrics(predict(params, features), class_labels, task_ids)


class HeadEvaluator:
    """Scores head state dicts on cached features of one split (train/val/test)."""

    def __init__(self, features: torch.Tensor, class_labels: torch.Tensor):
        self.features, self.classes = features, class_labels

    def predict(self, state_dicts: Sequence[dict[str, torch.Tensor]], task_ids: Sequence[int] | None = None
                ) -> torch.Tensor:
        """task_ids: unused (every task sees the same features; `domains.DomainHeadEvaluator` needs them)."""
        return predict(stack_state_dicts(state_dicts), self.features)  # (T, N)


def stack_state_dicts(state_dicts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([sd[k] for sd in state_dicts]) for k in HEAD_KEYS}


# ----------------------------------------------------------------------------------------------------------------
# The zoo on disk
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_path(zoo_dir: str | Path, task_id: int, k: int) -> Path:
    return Path(zoo_dir) / "checkpoints" / f"{int(task_id):04d}_{k}.safetensors"


def save_zoo(zoo_dir: str | Path, stacked: dict[str, torch.Tensor], task_ids: Sequence[int],
             metrics: dict[str, torch.Tensor], *, steps: Sequence[int], feature_dim: int, backbone: str) -> pd.DataFrame:
    """Write every checkpoint as a safetensors state dict with metadata, and the index CSV.

    Args:
        stacked: {key: (T, K, ...)}; metrics: {"accuracy": (T, K), "balanced_accuracy": (T, K)} on the test set.
    """
    rows = []
    n_ckpt = stacked[HEAD_KEYS[0]].shape[1]
    for i, task_id in enumerate(task_ids):
        emb = id_to_embedding(task_id)
        for k in range(n_ckpt):
            meta = {
                "arch": "binary_head", "feature_dim": feature_dim, "backbone": backbone, "task_id": int(task_id),
                "embedding": emb, "positive_classes": positive_classes(emb), "checkpoint": k, "step": int(steps[k]),
                "test_accuracy": float(metrics["accuracy"][i, k]),
                "test_balanced_accuracy": float(metrics["balanced_accuracy"][i, k]),
            }
            path = checkpoint_path(zoo_dir, task_id, k)
            save_safetensors_atomic({key: stacked[key][i, k] for key in HEAD_KEYS}, path, meta)
            rows.append({**{k2: v for k2, v in meta.items() if k2 != "positive_classes"},
                         "positive_classes": ",".join(meta["positive_classes"]), "path": str(path.name)})
    index = pd.DataFrame(rows)
    write_csv_atomic(Path(zoo_dir) / "index.csv", index)
    return index


def load_task_checkpoints(zoo_dir: str | Path, task_ids: Sequence[int], n_checkpoints: int
                          ) -> tuple[list[dict[str, torch.Tensor]], list[dict]]:
    """Read the checkpoints of exactly these tasks (and no other file of the zoo).

    Returns state dicts and their metadata, task-major (task 0 ckpt 0..K-1, task 1 ...).
    """
    state_dicts, metas = [], []
    for task_id in task_ids:
        for k in range(n_checkpoints):
            path = checkpoint_path(zoo_dir, task_id, k)
            tensors, meta = load_safetensors(path)
            if meta.get("task_id") != int(task_id):
                raise CheckpointError(f"{path}: metadata says task {meta.get('task_id')}, expected {task_id}")
            state_dicts.append(tensors)
            metas.append(meta)
    return state_dicts, metas
