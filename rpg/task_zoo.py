"""Stages 2-5 of the task-zoo experiment (paper §5): zoo, split, conditional RPG training, generation.

Each function is what one workflow rule runs. RPG training reads only the checkpoints of the training split (seen
tasks minus the validation tasks); unseen tasks' files are never opened before generation/evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from rpg.checkpoint import load_rpg
from rpg.config import Config
from rpg.diffusion import create_diffusion
from rpg.features import load_features
from rpg.generate import generate_tokens
from rpg.model import RPG
from rpg.tasks import ALL_TASK_IDS, TaskSplit, embedding_bits, embedding_to_id, id_to_embedding, make_split
from rpg.tokenize import Tokenizer
from rpg.tracking import start_tracking
from rpg.train import train_rpg
from rpg.utils import resolve_device, save_safetensors_atomic, write_csv_atomic, write_json_atomic
from rpg.zoo import (HEAD_KEYS, evaluate_heads, load_task_checkpoints, per_class_accuracy, save_zoo,
                     stack_state_dicts, train_heads, _save_steps)


def configured_task_ids(cfg: Config) -> list[int]:
    return list(ALL_TASK_IDS) if cfg.tasks.ids == "all" else sorted(set(cfg.tasks.ids))


# ----------------------------------------------------------------------------------------------------------------
# Zoo and split
# ----------------------------------------------------------------------------------------------------------------


def build_zoo(cfg: Config, features_path: str | Path, zoo_dir: str | Path) -> dict:
    """Train every task's head (batched), evaluate its checkpoints on the test set, write the zoo dataset."""
    torch.set_num_threads(cfg.threads)
    feats = load_features(features_path)
    task_ids = configured_task_ids(cfg)
    z = cfg.zoo
    tracker = start_tracking(cfg.logging, name=f"{cfg.experiment}-zoo", group=cfg.experiment, job_type="zoo",
                             config=cfg.raw, directory=Path(cfg.results_dir) / "wandb")
    start = time.time()
    stacked = train_heads(feats["train_x"], feats["train_y"], task_ids, steps=z.steps, batch_size=z.batch_size,
                          lr=z.lr, weight_decay=z.weight_decay, n_checkpoints=z.n_checkpoints,
                          save_every=z.save_every, seed=cfg.seed, task_chunk=z.task_chunk,
                          progress=cfg.logging.progress,
                          on_step=lambda step, loss: tracker.log({"zoo/mean_task_loss": loss}, step=step))
    train_seconds = time.time() - start
    metrics = {"accuracy": torch.empty(len(task_ids), z.n_checkpoints),
               "balanced_accuracy": torch.empty(len(task_ids), z.n_checkpoints)}
    for k in range(z.n_checkpoints):
        m = evaluate_heads({key: v[:, k] for key, v in stacked.items()}, task_ids, feats["test_x"], feats["test_y"])
        for key in metrics:
            metrics[key][:, k] = m[key]
    index = save_zoo(zoo_dir, stacked, task_ids, metrics, steps=_save_steps(z.steps, z.n_checkpoints, z.save_every),
                     feature_dim=int(feats["train_x"].shape[1]), backbone=cfg.backbone.arch)
    summary = {"n_tasks": len(task_ids), "n_checkpoints": len(index), "train_seconds": train_seconds,
               "mean_test_accuracy": float(metrics["accuracy"].mean()),
               "mean_test_balanced_accuracy": float(metrics["balanced_accuracy"].mean())}
    tracker.summary(summary)
    tracker.finish()
    write_json_atomic(Path(zoo_dir) / "summary.json", summary)
    return summary


def write_split(cfg: Config, out_path: str | Path) -> TaskSplit:
    task_ids = configured_task_ids(cfg)
    split = make_split(task_ids, cfg.tasks.unseen, cfg.tasks.n_val, cfg.seed)
    for emb in cfg.tasks.table11:
        if embedding_to_id(emb) not in split.unseen:
            raise ValueError(f"Table 11 embedding {emb} (task {embedding_to_id(emb)}) is not an unseen task")
    write_json_atomic(out_path, split.to_dict())
    return split


def read_split(path: str | Path) -> TaskSplit:
    return TaskSplit.from_dict(json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------------------------------------------
# Generation helpers
# ----------------------------------------------------------------------------------------------------------------


def generate_heads(model: RPG, tokenizer: Tokenizer, cfg: Config, task_ids: Sequence[int], n_samples: int,
                   seed: int) -> dict[str, torch.Tensor]:
    """`n_samples` generated heads per task, stacked task-major: {key: (len(task_ids) * n_samples, ...)}."""
    diffusion = create_diffusion(cfg.diffusion)
    bits = embedding_bits(task_ids).repeat_interleave(n_samples, dim=0)  # (T*S, 10)
    tokens = generate_tokens(
        model, diffusion, len(bits), cond=bits, sampler=cfg.diffusion.sampler, steps=cfg.diffusion.sample_steps,
        eta=cfg.diffusion.eta, clip_x0=cfg.diffusion.clip_x0, mode=cfg.generate.mode,
        tokens_per_call=cfg.generate.tokens_per_call, generator=torch.Generator().manual_seed(seed),
        bf16=cfg.train.bf16,
    )
    return stack_state_dicts([tokenizer.detokenize(t) for t in tokens])


def make_validator(cfg: Config, tokenizer: Tokenizer, val_ids: Sequence[int], val_x: torch.Tensor,
                   val_y: torch.Tensor, original_val_acc: torch.Tensor):
    """Score = mean accuracy, on held-out training images, of heads generated for the validation tasks."""
    n = cfg.train.val_samples

    def validate(model: RPG) -> dict[str, float]:
        start = time.time()
        heads = generate_heads(model, tokenizer, cfg, val_ids, n, seed=cfg.seed + 17)
        acc = evaluate_heads(heads, [t for t in val_ids for _ in range(n)], val_x, val_y)["accuracy"]
        acc = acc.view(len(val_ids), n)
        norm = torch.cat([heads[k].flatten(1) for k in HEAD_KEYS], 1).norm(dim=1)
        return {"score": float(acc.mean()), "gap_mean": float((original_val_acc - acc.mean(1)).mean()),
                "gap_best": float((original_val_acc - acc.max(1).values).mean()),
                "generated_param_norm": float(norm.mean()), "seconds": time.time() - start}

    return validate


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def train_conditional_rpg(cfg: Config, zoo_dir: str | Path, split_path: str | Path, features_path: str | Path,
                          out_dir: str | Path) -> dict:
    """Train the task-conditioned RPG on the training split's checkpoints; keep the best by validation score."""
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    split = read_split(split_path)
    model_cfg = cfg.model
    k = cfg.zoo.n_checkpoints
    state_dicts, metas = load_task_checkpoints(zoo_dir, split.train, k)  # the training split only
    tokenizer = Tokenizer.fit(state_dicts, model_cfg.token_size)
    tokens = torch.stack([tokenizer.tokenize(sd) for sd in state_dicts])  # (K, N, L)
    cond = embedding_bits([m["task_id"] for m in metas])  # (K, 10)

    feats = load_features(features_path)
    val_sds, _ = load_task_checkpoints(zoo_dir, split.val, k)  # seen tasks held out of training
    val_stack = stack_state_dicts(val_sds)
    val_ids_rep = [t for t in split.val for _ in range(k)]
    orig = evaluate_heads(val_stack, val_ids_rep, feats["val_x"], feats["val_y"])["accuracy"].view(-1, k).mean(1)
    validate = make_validator(cfg, tokenizer, split.val, feats["val_x"], feats["val_y"], orig) if split.val else None

    tracker = start_tracking(cfg.logging, name=f"{cfg.experiment}-rpg", group=cfg.experiment, job_type="train_rpg",
                             config=cfg.raw, directory=Path(cfg.results_dir) / "wandb")
    out_dir = Path(out_dir)
    (out_dir / "layout.json").parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "layout.json", tokenizer.layout())
    summary = train_rpg(model_cfg, cfg.diffusion, cfg.train, tokenizer, tokens, out_dir, cond=cond, seed=cfg.seed,
                        device=device, validate=validate, tracker=tracker, progress=cfg.logging.progress)
    tracker.finish()
    summary = {**summary, "n_train_tasks": len(split.train), "n_val_tasks": len(split.val),
               "val_original_accuracy": float(orig.mean()) if len(orig) else None}
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Generation + evaluation for the tables
# ----------------------------------------------------------------------------------------------------------------


def generation_plan(cfg: Config, split: TaskSplit) -> dict[str, list[int]]:
    """Which tasks get generated: all unseen, a seeded sample of training tasks, and the flip pair."""
    n_seen = min(cfg.tasks.n_seen_eval, len(split.train))
    seen = sorted(torch.randperm(len(split.train), generator=torch.Generator().manual_seed(cfg.seed + 5))[:n_seen]
                  .tolist())
    flip = [embedding_to_id(e) for e in cfg.tasks.flip_pair]
    return {"unseen": list(split.unseen), "seen": [split.train[i] for i in seen], "flip": flip}


def generate_and_evaluate(cfg: Config, rpg_path: str | Path, split_path: str | Path, features_path: str | Path,
                          zoo_dir: str | Path, out_dir: str | Path) -> pd.DataFrame:
    """Generate `generate.samples` heads per planned task, save them, and evaluate originals and samples.

    Writes `samples.csv` (one row per generated or original model: task, group, kind, accuracy, balanced accuracy,
    per-class accuracies) and the generated heads as safetensors under `heads/`.
    """
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    split = read_split(split_path)
    feats = load_features(features_path)
    model, tokenizer, _, meta = load_rpg(rpg_path, device)
    plan = generation_plan(cfg, split)
    out_dir = Path(out_dir)
    n, k = cfg.generate.samples, cfg.zoo.n_checkpoints
    rows = []
    timing = {}
    for group, task_ids in plan.items():
        if not task_ids:
            continue
        start = time.time()
        heads = generate_heads(model, tokenizer, cfg, task_ids, n, seed=cfg.seed + 1000 + len(rows))
        timing[group] = (time.time() - start) / (len(task_ids) * n)
        ids_rep = [t for t in task_ids for _ in range(n)]
        rows += _evaluate_rows(heads, ids_rep, feats, group, "rpg", list(range(n)) * len(task_ids))
        for i, t in enumerate(ids_rep):
            save_safetensors_atomic({key: heads[key][i] for key in HEAD_KEYS},
                                    out_dir / "heads" / f"{t:04d}_s{i % n}.safetensors",
                                    {"arch": "binary_head", "task_id": t, "embedding": id_to_embedding(t),
                                     "sample": i % n, "generator": str(rpg_path), "generator_step": meta["step"]})
        # Originals are read only now, after the generator has been trained and loaded.
        orig_sds, _ = load_task_checkpoints(zoo_dir, task_ids, k)
        orig_ids = [t for t in task_ids for _ in range(k)]
        rows += _evaluate_rows(stack_state_dicts(orig_sds), orig_ids, feats, group, "original",
                               list(range(k)) * len(task_ids))
    frame = pd.DataFrame(rows)
    write_csv_atomic(out_dir / "samples.csv", frame)
    write_json_atomic(out_dir / "timing.json", {"seconds_per_generated_model": timing,
                                                "sampler": cfg.diffusion.sampler,
                                                "steps": cfg.diffusion.sample_steps, "mode": cfg.generate.mode,
                                                "generator_step": meta["step"]})
    return frame


def _evaluate_rows(heads: dict[str, torch.Tensor], task_ids: list[int], feats: dict[str, torch.Tensor], group: str,
                   kind: str, index: list[int]) -> list[dict]:
    m = evaluate_heads(heads, task_ids, feats["test_x"], feats["test_y"])
    pc = per_class_accuracy(heads, task_ids, feats["test_x"], feats["test_y"])
    rows = []
    for i, t in enumerate(task_ids):
        row = {"group": group, "kind": kind, "task_id": t, "embedding": id_to_embedding(t), "index": index[i],
               "accuracy": float(m["accuracy"][i]), "balanced_accuracy": float(m["balanced_accuracy"][i])}
        row.update({f"class_{c}": float(pc[i, c]) for c in range(10)})
        rows.append(row)
    return rows
