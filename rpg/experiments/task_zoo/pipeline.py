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
from rpg.config import TASK_BITS, Config
from rpg.evaluation import (BALANCED_ACCURACY, KIND_ORIGINAL, KIND_RPG, Models, SampleRows, create_baseline,
                            register_spec, samples_table)
from rpg.experiments.task_zoo.domains import make_domain_codes, stored_domain_codes
from rpg.experiments.task_zoo.features import load_features
from rpg.model import RPG
from rpg.experiments.task_zoo.tasks import (ALL_TASK_IDS, TaskSplit, binary_labels, embedding_to_id, id_to_embedding,
                                            make_split, rows_by_domain)
from rpg.tokenize import Tokenizer
from rpg.tracking import Tracker, start_tracking
from rpg.train import process_rank, train_rpg
from rpg.utils import (read_safetensors_metadata, resolve_device, save_safetensors_atomic, write_csv_atomic,
                       write_json_atomic)
from rpg.weightspace import flatten
from rpg.experiments.task_zoo.canonical import Gauge
from rpg.experiments.task_zoo.baselines import (NOISE_SEED_OFFSET, TrainingZoo, flatten_heads, load_training_zoo,
                                                unflatten_heads)
from rpg.experiments.task_zoo.methods import FAMILY as METHOD_FAMILY
from rpg.experiments.task_zoo.methods import (BUILTIN, MethodContext, TaskGenerator, TaskQuery, condition,
                                              fitted_methods, generate_models)
from rpg.experiments.task_zoo.heads import (HeadEvaluator, checkpoint_path, evaluate_heads, load_task_checkpoints,
                                            save_steps, save_zoo, task_metrics, train_heads)


def configured_task_ids(cfg: Config) -> list[int]:
    """The zoo's task ids: tasks.ids, or with `domains.names` every (class set, domain) pair of `domains`."""
    if cfg.domains.names:
        from rpg.experiments.task_zoo.domains import domain_task_ids

        return domain_task_ids(cfg)
    return list(ALL_TASK_IDS) if cfg.tasks.ids == "all" else sorted(set(cfg.tasks.ids))


def unseen_task_ids(cfg: Config) -> list[int]:
    """tasks.unseen, or with `domains.names` the held-out (class set, domain) pairs (`domains.unseen_tasks`)."""
    if cfg.domains.names:
        from rpg.experiments.task_zoo.domains import unseen_tasks

        return unseen_tasks(cfg.tasks.unseen, len(cfg.domains.names))
    return list(cfg.tasks.unseen)


def label_free_domain_indices(cfg: Config) -> list[int]:
    """The indices in domains.names of tasks.label_free_domains."""
    unknown = [n for n in cfg.tasks.label_free_domains if n not in cfg.domains.names[1:]]
    if unknown:
        raise ValueError(f"tasks.label_free_domains {unknown} are not shifted domains of domains.names "
                         f"({', '.join(cfg.domains.names[1:]) or 'none'})")
    return [cfg.domains.names.index(n) for n in cfg.tasks.label_free_domains]


def domain_code_table(cfg: Config, features_path: str | Path | None) -> torch.Tensor | None:
    """Each domain's code in RPG's condition (`rpg.condition_domain`), from the domain features' training images
    (their labels unread); None for the one-hot code (no domains, or `onehot`). Shapes: -> (D, c)."""
    if not cfg.domains.names or cfg.model.condition_domain == "onehot":
        return None
    if features_path is None:
        raise ValueError(f"rpg.condition_domain: {cfg.model.condition_domain} needs the domain features")
    codes = make_domain_codes(cfg.model.condition_domain, load_features(features_path)["train_x"])
    if TASK_BITS + codes.shape[1] != cfg.model.condition_dim:
        raise ValueError(f"domain codes of width {codes.shape[1]} from {features_path}, but the condition expects "
                         f"{cfg.model.condition_dim - TASK_BITS} (is backbone.feature_dim the features' width?)")
    return codes


# ----------------------------------------------------------------------------------------------------------------
# Zoo and split
# ----------------------------------------------------------------------------------------------------------------


def build_zoo(cfg: Config, features_path: str | Path, zoo_dir: str | Path) -> dict:
    """Train every task's head (batched), evaluate its checkpoints on the test set, write the zoo dataset.

    Domain tasks (features (D, N, d)): each domain's tasks train together on that domain's features, from the same
    initial head(s) and minibatch indices as every other domain.
    """
    feats = load_features(features_path)
    task_ids = configured_task_ids(cfg)
    z = cfg.zoo
    tracker = start_tracking(cfg.logging, name=f"{cfg.experiment}-zoo", group=cfg.experiment, job_type="zoo",
                             config=cfg.raw, directory=Path(cfg.results_dir) / "wandb")
    start = time.time()
    per_domain = feats["train_x"].ndim == 3
    groups = rows_by_domain(task_ids) if per_domain else [(0, torch.arange(len(task_ids)))]
    stacked: dict[str, torch.Tensor] = {}
    metrics = {"accuracy": torch.empty(len(task_ids), z.n_checkpoints),
               "balanced_accuracy": torch.empty(len(task_ids), z.n_checkpoints)}
    for d, rows in groups:
        ids = [task_ids[i] for i in rows.tolist()]
        train_x, test_x = (feats["train_x"][d], feats["test_x"][d]) if per_domain else (feats["train_x"], feats["test_x"])
        part = train_heads(train_x, feats["train_y"], ids, steps=z.steps, batch_size=z.batch_size,
                           lr=z.lr, weight_decay=z.weight_decay, n_checkpoints=z.n_checkpoints,
                           save_every=z.save_every, seed=cfg.seed, task_chunk=z.task_chunk, init=z.init,
                           progress=cfg.logging.progress,
                           on_step=lambda step, loss: tracker.log({"zoo/mean_task_loss": loss}, step=step))
        for key, v in part.items():
            stacked.setdefault(key, torch.empty(len(task_ids), *v.shape[1:]))[rows] = v
        for k in range(z.n_checkpoints):
            m = evaluate_heads({key: v[:, k] for key, v in part.items()}, ids, test_x, feats["test_y"])
            for key in metrics:
                metrics[key][rows, k] = m[key]
    train_seconds = time.time() - start
    index = save_zoo(zoo_dir, stacked, task_ids, metrics, steps=save_steps(z.steps, z.n_checkpoints, z.save_every),
                     feature_dim=int(feats["train_x"].shape[-1]), backbone=cfg.backbone.arch)
    summary = {"n_tasks": len(task_ids), "n_checkpoints": len(index), "train_seconds": train_seconds,
               "mean_test_accuracy": float(metrics["accuracy"].mean()),
               "mean_test_balanced_accuracy": float(metrics["balanced_accuracy"].mean())}
    tracker.summary(summary)
    tracker.finish()
    write_json_atomic(Path(zoo_dir) / "summary.json", summary)
    return summary


def write_split(cfg: Config, out_path: str | Path) -> TaskSplit:
    task_ids = configured_task_ids(cfg)
    split = make_split(task_ids, unseen_task_ids(cfg), cfg.tasks.n_val, cfg.seed, n_seen=cfg.tasks.n_seen,
                       holdout_neighbours=cfg.tasks.holdout_neighbours,
                       shifted_domain_tasks=cfg.tasks.shifted_domain_tasks,
                       label_free_domains=label_free_domain_indices(cfg))
    for emb in cfg.tasks.table11:
        if embedding_to_id(emb) not in split.unseen:
            raise ValueError(f"Table 11 embedding {emb} (task {embedding_to_id(emb)}) is not an unseen task")
    write_json_atomic(out_path, split.to_dict())
    return split


def read_split(path: str | Path) -> TaskSplit:
    return TaskSplit.from_dict(json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and generation helpers
# ----------------------------------------------------------------------------------------------------------------


def make_evaluator(cfg: Config, features_path: str | Path | None, split: str):
    """Scores state dicts on `split` ("val" or "test"): heads on cached features, or full models on images."""
    if cfg.zoo.mode == "finetune":
        from rpg.experiments.task_zoo.finetune import ModelEvaluator

        return ModelEvaluator(cfg, split)
    feats = load_features(features_path)
    if feats[f"{split}_x"].ndim == 3:  # domain tasks: (D, N, d)
        from rpg.experiments.task_zoo.domains import DomainHeadEvaluator

        return DomainHeadEvaluator(feats[f"{split}_x"], feats[f"{split}_y"])
    return HeadEvaluator(feats[f"{split}_x"], feats[f"{split}_y"])


def evaluate(evaluator, state_dicts: Sequence[dict[str, torch.Tensor]], task_ids: Sequence[int]) -> dict:
    """{"accuracy": (T,), "balanced_accuracy": (T,), "per_class": (T, 10)} of model i on task task_ids[i]."""
    return task_metrics(evaluator.predict(state_dicts, task_ids), evaluator.classes, task_ids)


def make_validator(cfg: Config, tokenizer: Tokenizer, val_ids: Sequence[int], evaluator,
                   original_val_acc: torch.Tensor, domain_codes: torch.Tensor | None = None,
                   guidance: float | None = None, n_samples: int | None = None):
    """Score = mean accuracy, on held-out training images, of models generated for the validation tasks
    (`n_samples` each, default train.val_samples; `guidance` as `generate_models`)."""
    n = n_samples or cfg.train.val_samples

    def validate(model: RPG) -> dict[str, float]:
        start = time.time()
        sds = generate_models(model, tokenizer, cfg, val_ids, n, seed=cfg.seed + 17, domain_codes=domain_codes,
                              guidance=guidance)
        acc = evaluate(evaluator, sds, [t for t in val_ids for _ in range(n)])["accuracy"].view(len(val_ids), n)
        norm = flatten(sds, list(sds[0])).norm(dim=1)
        return {"score": float(acc.mean()), "gap_mean": float((original_val_acc - acc.mean(1)).mean()),
                "gap_best": float((original_val_acc - acc.max(1).values).mean()),
                "generated_param_norm": float(norm.mean()), "seconds": time.time() - start}

    return validate


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def train_conditional_rpg(cfg: Config, zoo_dir: str | Path, split_path: str | Path,
                          features_path: str | Path | None, out_dir: str | Path) -> dict:
    """Train the task-conditioned RPG on the training split's checkpoints; keep the best by validation score."""
    device = resolve_device(cfg.device)
    split = read_split(split_path)
    model_cfg = cfg.model
    k = cfg.zoo.n_checkpoints
    state_dicts, metas = load_task_checkpoints(zoo_dir, split.train, k)  # the training split only
    if cfg.train.canonicalise != "none":  # one hidden-unit order for every head (the same functions)
        if cfg.zoo.mode != "batched_heads":
            raise ValueError("train.canonicalise applies to the head zoo (zoo.mode: batched_heads) only")
        state_dicts = Gauge.fit(cfg.train.canonicalise, state_dicts, k)(state_dicts, k)
    tokenizer = Tokenizer.fit(state_dicts, model_cfg.token_size)
    tokens = torch.stack([tokenizer.tokenize(sd) for sd in state_dicts])  # (K, N, L)
    codes = domain_code_table(cfg, features_path)
    cond = condition(cfg, [m["task_id"] for m in metas], codes)  # (K, condition_dim)
    del state_dicts

    validate, orig = None, torch.empty(0)
    main_process = process_rank() == 0  # under torchrun only rank 0 validates and writes
    if split.val and main_process:
        evaluator = make_evaluator(cfg, features_path, "val")
        val_sds, _ = load_task_checkpoints(zoo_dir, split.val, k)  # seen tasks held out of training
        val_ids_rep = [t for t in split.val for _ in range(k)]
        orig = evaluate(evaluator, val_sds, val_ids_rep)["accuracy"].view(-1, k).mean(1)
        validate = make_validator(cfg, tokenizer, split.val, evaluator, orig, codes)

    tracker = start_tracking(cfg.logging, name=f"{cfg.experiment}-rpg", group=cfg.experiment, job_type="train_rpg",
                             config=cfg.raw, directory=Path(cfg.results_dir) / "wandb") if main_process else Tracker()
    out_dir = Path(out_dir)
    summary = train_rpg(model_cfg, cfg.diffusion, cfg.train, tokenizer, tokens, out_dir, cond=cond, seed=cfg.seed,
                        device=device, validate=validate, tracker=tracker, progress=cfg.logging.progress,
                        force=True,  # the workflow's config is the source of truth: a new step count retrains
                        metadata=_domain_metadata(cfg, codes), files={"layout.json": tokenizer.layout()})
    tracker.finish()
    summary = {**summary, "n_train_tasks": len(split.train), "n_val_tasks": len(split.val),
               "val_original_accuracy": float(orig.mean()) if len(orig) else None}
    if main_process:
        write_json_atomic(out_dir / "summary.json", summary)
    return summary


def _domain_metadata(cfg: Config, codes: torch.Tensor | None) -> dict | None:
    """What a generator file keeps about its domain condition: the domain names (+ the codes, unless one-hot)."""
    if not cfg.domains.names:
        return None
    return {"domains": list(cfg.domains.names), **({} if codes is None else {"domain_codes": codes.tolist()})}


def guidance_validation(cfg: Config, rpg_path: str | Path, zoo_dir: str | Path, split_path: str | Path,
                        features_path: str | Path | None, scales: Sequence[float], n_samples: int) -> pd.DataFrame:
    """A trained generator's seen-validation score (the validator's, `n_samples` per validation task) at each
    classifier-free guidance scale: how `rpg.guidance_scale` is chosen without reading an unseen task.

    Returns: one row per scale: scale, score, gap_mean, gap_best (as the validator's, fractions), val_original.
    """
    split = read_split(split_path)
    model, tokenizer, _, meta = load_rpg(rpg_path, resolve_device(cfg.device))
    evaluator = make_evaluator(cfg, features_path, "val")
    k = cfg.zoo.n_checkpoints
    val_sds, _ = load_task_checkpoints(zoo_dir, split.val, k)
    orig = evaluate(evaluator, val_sds, [t for t in split.val for _ in range(k)])["accuracy"].view(-1, k).mean(1)
    rows = []
    for scale in scales:
        validate = make_validator(cfg, tokenizer, split.val, evaluator, orig, stored_domain_codes(meta), scale,
                                  n_samples)
        rows.append({"scale": scale, **validate(model), "val_original": float(orig.mean()),
                     "generator_step": meta["step"], "n_val_tasks": len(split.val), "samples": n_samples})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# Generation + evaluation for the tables
# ----------------------------------------------------------------------------------------------------------------


def generation_plan(cfg: Config, split: TaskSplit) -> dict[str, list[int]]:
    """Which tasks get generated: all unseen, a seeded sample of training tasks, and the flip pair."""
    n_seen = min(cfg.tasks.n_seen_eval, len(split.train))
    pick = torch.randperm(len(split.train), generator=torch.Generator().manual_seed(cfg.seed + 5))[:n_seen]
    flip = [embedding_to_id(e) for e in cfg.tasks.flip_pair]
    return {"unseen": list(split.unseen), "seen": sorted(split.train[i] for i in pick.tolist()), "flip": flip}


def generate_and_evaluate(cfg: Config, rpg_path: str | Path, split_path: str | Path,
                          features_path: str | Path | None, zoo_dir: str | Path, out_dir: str | Path,
                          backbone_path: str | Path | None = None) -> pd.DataFrame:
    """Generate `generate.samples` models per unseen / flip-pair task (`seen_samples` per seen task), save them,
    and evaluate them beside their originals and the baselines (`rpg.experiments.task_zoo.methods`, the built-in
    methods after `rpg`).

    Writes `samples.csv` (one row per generated, original or baseline model: group, kind, task, accuracy, balanced
    accuracy, per-class accuracies, and the novelty columns of `rpg.evaluation`: l2_novelty (L2 to the nearest
    training checkpoint), max_iou_original (max wrong-prediction IoU against the task's originals), pairwise_iou
    (mean IoU against the task's other models of the same kind)), `timing.json`, and
    the generated state dicts as safetensors under `models/`. Head baselines and L2 novelty exist for the head zoo
    (batched_heads mode) only; `compose` needs the backbone's 10-class classifier (`backbone_path`).
    """
    device = resolve_device(cfg.device)
    split = read_split(split_path)
    evaluator = make_evaluator(cfg, features_path, "test")
    ctx = MethodContext(cfg, rpg_path, backbone_path)
    rpg = create_baseline(KIND_RPG, METHOD_FAMILY, ctx)
    out_dir = Path(out_dir)
    k = cfg.zoo.n_checkpoints
    # The baselines see the training split only, read here before any other task's file.
    train_zoo = (load_training_zoo(zoo_dir, split, k, cfg.train.canonicalise) if cfg.zoo.mode == "batched_heads"
                 else None)
    baselines = (fitted_methods(BUILTIN[1:], ctx, train_zoo, condition(cfg, train_zoo.task_ids))
                 if train_zoo is not None else {})
    frames, timing = [], {}
    for g, (group, task_ids) in enumerate(generation_plan(cfg, split).items()):
        if not task_ids:
            continue
        n = samples_per_task(cfg, group)
        start = time.time()
        sds = rpg.state_dicts(_query(cfg, task_ids, n, seed=cfg.seed + 1000 * (g + 1)))
        timing[group] = (time.time() - start) / len(sds)
        ids_rep = [t for t in task_ids for _ in range(n)]
        # The flip pair repeats an unseen (and maybe a sampled seen) task: its samples go to models/flip/.
        models_dir = out_dir / "models" / ("flip" if group == "flip" else "")
        for i, (t, sd) in enumerate(zip(ids_rep, sds)):
            save_safetensors_atomic(sd, models_dir / f"{t:04d}_s{i % n}.safetensors",
                                    {"arch": cfg.backbone.arch if cfg.zoo.mode == "finetune" else "binary_head",
                                     "task_id": t, "embedding": id_to_embedding(t), "sample": i % n,
                                     "generator": str(rpg_path), "generator_step": rpg.meta["step"]})
        scored = [_models(evaluator, KIND_RPG, sds, ids_rep, list(range(n)) * len(task_ids), train_zoo)]
        if baselines:
            noise_l2 = float(train_zoo.collection.novelty(scored[0].flat).mean())
            query = _query(cfg, task_ids, n, seed=cfg.seed + NOISE_SEED_OFFSET + g, reference_l2=noise_l2)
            found = [method_models(evaluator, name, method, query, train_zoo) for name, method in baselines.items()]
            scored += [s for s in found if s is not None]
        # The task's originals are read only now; the baselines come from `train_zoo`, read before any of them.
        originals = _originals(evaluator, zoo_dir, task_ids, k, train_zoo)
        frames += _group_rows(group, originals, [originals, *scored], train_zoo)
    frame = samples_table(frames, float_dtype="float64")  # the task zoo's samples.csv has always had float64
    write_csv_atomic(out_dir / "samples.csv", frame)
    write_json_atomic(out_dir / "timing.json", {"seconds_per_generated_model": timing,
                                                "sampler": cfg.diffusion.sampler,
                                                "steps": cfg.diffusion.sample_steps, "mode": cfg.generate.mode,
                                                "generator_step": rpg.meta["step"], "device": str(device)})
    return frame


STUDY_GROUPS = ("unseen", "seen")  # the groups of `generation_plan` a study method is scored on


def evaluate_method(cfg: Config, spec: str, split_path: str | Path, features_path: str | Path, zoo_dir: str | Path,
                    rpg_samples: str | Path, out_csv: str | Path, backbone_path: str | Path | None = None,
                    rpg_path: str | Path | None = None) -> pd.DataFrame:
    """Rule study_method: a user's method (`spec`, `module:callable`, see `rpg.experiments.task_zoo.methods`)
    fitted on the regime's training split and scored like the built-ins in `generate_and_evaluate`: the same
    tasks (`generation_plan`'s unseen and seen groups), as many heads as RPG samples, the same seeds, evaluator,
    originals and novelty. rpg_samples: the regime's samples.csv (RPG's mean novelty per group, `reference_l2`);
    backbone_path / rpg_path: what the method's `MethodContext` offers. Writes samples.csv rows of the method only
    (kind: its registered name)."""
    if cfg.zoo.mode != "batched_heads":
        raise ValueError("study.methods are scored on the head zoo (zoo.mode: batched_heads) only")
    name = register_spec(METHOD_FAMILY, spec)
    split = read_split(split_path)
    evaluator = make_evaluator(cfg, features_path, "test")
    k = cfg.zoo.n_checkpoints
    train_zoo = load_training_zoo(zoo_dir, split, k, cfg.train.canonicalise)  # before any other task's file
    method = fitted_methods([name], MethodContext(cfg, rpg_path, backbone_path), train_zoo,
                            condition(cfg, train_zoo.task_ids)).get(name)
    if method is None:
        raise ValueError(f"study method '{spec}' returned no method for regime {cfg.experiment}")
    rpg_rows = pd.read_csv(rpg_samples, usecols=["group", "kind", "l2_novelty"])
    frames = []
    for g, (group, task_ids) in enumerate(generation_plan(cfg, split).items()):
        if group not in STUDY_GROUPS or not task_ids:
            continue
        n = samples_per_task(cfg, group)
        ref = rpg_rows.l2_novelty[(rpg_rows.group == group) & (rpg_rows.kind == KIND_RPG)].mean()
        models = method_models(evaluator, name, method,
                               _query(cfg, task_ids, n, seed=cfg.seed + NOISE_SEED_OFFSET + g, reference_l2=ref),
                               train_zoo)
        if models is None:
            continue
        frames += _group_rows(group, _originals(evaluator, zoo_dir, task_ids, k, train_zoo), [models], train_zoo)
    frame = samples_table(frames, float_dtype="float64")
    write_csv_atomic(out_csv, frame)
    return frame


def samples_per_task(cfg: Config, group: str) -> int:
    """How many heads RPG samples (and a method may give) per task of a `generation_plan` group."""
    return cfg.generate.seen_samples if group == "seen" else cfg.generate.samples


def _group_rows(group: str, originals: Models, scored: Sequence[Models], train_zoo: TrainingZoo | None
                ) -> list[pd.DataFrame]:
    """samples.csv rows of scored models of one group, against the group's originals (`rpg.evaluation.SampleRows`)."""
    builder = SampleRows(originals, train_zoo.collection if train_zoo is not None else None, pairwise_iou=True)
    frames = [builder.rows(models) for models in scored]
    for frame in frames:
        frame.insert(0, "group", group)
    return frames


def _query(cfg: Config, task_ids: Sequence[int], n: int, seed: int, reference_l2: float = float("nan")
           ) -> TaskQuery:
    return TaskQuery(tuple(task_ids), condition(cfg, task_ids), n, seed, reference_l2)


def _originals(evaluator, zoo_dir: str | Path, task_ids: Sequence[int], k: int,
               train_zoo: TrainingZoo | None) -> Models:
    """The tasks' own checkpoints, scored (read only after every method has answered for these tasks)."""
    orig_sds, _ = load_task_checkpoints(zoo_dir, task_ids, k)
    return _models(evaluator, KIND_ORIGINAL, orig_sds, [t for t in task_ids for _ in range(k)],
                   list(range(k)) * len(task_ids), train_zoo)


def method_models(evaluator, name: str, method: TaskGenerator, query: TaskQuery,
                  train_zoo: TrainingZoo) -> Models | None:
    """A method's answer to `query`, scored: its heads (or, function space, its predictions) as models of kind
    `name`, numbered 0..m-1 per task; heads with NaN are left out; None when it gave none."""
    t = len(query.task_ids)
    if method.function_space:
        preds = method.predict(query, evaluator.features)
        m = _answer_width(name, preds, t, query.n)
        return _predicted(evaluator, name, preds.reshape(t * m, -1), [i for i in query.task_ids for _ in range(m)],
                          list(range(m)) * t)
    heads = method.generate(query)
    m = _answer_width(name, heads, t, query.n)
    return _flat_models(evaluator, name, heads.reshape(t * m, -1), [i for i in query.task_ids for _ in range(m)],
                        train_zoo, list(range(m)) * t)


def _answer_width(name: str, answer: torch.Tensor, n_tasks: int, n: int) -> int:
    if answer.ndim != 3 or answer.shape[0] != n_tasks or not 1 <= answer.shape[1] <= n:
        raise ValueError(f"method '{name}' answered shape {tuple(answer.shape)} for {n_tasks} tasks and n={n} "
                         f"(expected ({n_tasks}, m, ...) with 1 <= m <= {n})")
    return answer.shape[1]


def _models(evaluator, kind: str, state_dicts: Sequence[dict[str, torch.Tensor]], task_ids: Sequence[int],
            index: list[int], train_zoo: TrainingZoo | None) -> Models:
    """State dicts scored on their tasks, as points in the training zoo's coordinates (head zoo only)."""
    flat = flatten_heads(train_zoo.canonical(state_dicts)) if train_zoo is not None else None
    return _predicted(evaluator, kind, evaluator.predict(state_dicts, task_ids), task_ids, index, flat)


def _flat_models(evaluator, kind: str, flat: torch.Tensor, task_ids: Sequence[int],
                 train_zoo: TrainingZoo, index: Sequence[int]) -> Models | None:
    """Flat heads, head i for task task_ids[i] numbered index[i]; heads with NaN (a baseline that does not exist
    for the task) are left out, None when none is left."""
    keep = [i for i in range(len(task_ids)) if not bool(flat[i].isnan().any())]
    if not keep:
        return None
    sds = unflatten_heads(flat[keep], train_zoo.shapes)
    return _models(evaluator, kind, sds, [task_ids[i] for i in keep], [index[i] for i in keep], train_zoo)


def _predicted(evaluator, kind: str, preds: torch.Tensor, task_ids: Sequence[int], index: list[int],
               flat: torch.Tensor | None = None) -> Models:
    """Predictions (M, N) of models of `kind` on their tasks, with the task zoo's identity columns and metrics."""
    m = task_metrics(preds, evaluator.classes, task_ids)
    return Models(kind, preds, binary_labels(evaluator.classes, task_ids), flat=flat, index=index,
                  tasks=list(task_ids),
                  columns={"task_id": list(task_ids), "embedding": [id_to_embedding(t) for t in task_ids]},
                  metrics={BALANCED_ACCURACY: m["balanced_accuracy"],
                           **{f"class_{c}": m["per_class"][:, c] for c in range(10)}})


def index_zoo(cfg: Config, zoo_dir: str | Path) -> dict:
    """Index a zoo written one task at a time (finetune mode) from the checkpoints' metadata."""
    rows = []
    for t in configured_task_ids(cfg):
        for k in range(cfg.zoo.n_checkpoints):
            path = checkpoint_path(zoo_dir, t, k)
            meta = read_safetensors_metadata(path)
            rows.append({**{key: v for key, v in meta.items() if key != "positive_classes"},
                         "positive_classes": ",".join(meta.get("positive_classes", [])), "path": path.name})
    index = pd.DataFrame(rows)
    write_csv_atomic(Path(zoo_dir) / "index.csv", index)
    summary = {"n_tasks": int(index.task_id.nunique()), "n_checkpoints": len(index),
               "mean_test_accuracy": float(index.test_accuracy.mean()),
               "mean_test_balanced_accuracy": float(index.test_balanced_accuracy.mean())}
    write_json_atomic(Path(zoo_dir) / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    """`python -m rpg.experiments.task_zoo.pipeline train ...`: the train_rpg rule outside Snakemake, e.g. under torchrun (DDP)."""
    import argparse

    from rpg.allocator import keep_freed_memory
    from rpg.config import load_config

    p = argparse.ArgumentParser(prog="python -m rpg.experiments.task_zoo.pipeline", description=main.__doc__)
    sub = p.add_subparsers(dest="stage", required=True)
    t = sub.add_parser("train", help="train the task-conditioned RPG on a zoo's training split")
    t.add_argument("--config", nargs="+", default=["config/config.yaml"], help="YAML files, later ones override")
    t.add_argument("--zoo", required=True, help="zoo folder (holds checkpoints/ and index.csv)")
    t.add_argument("--split", required=True, help="split.json written by the split rule")
    t.add_argument("--features", default=None, help="features.safetensors (batched_heads mode)")
    t.add_argument("--out", required=True, help="output folder for best/last checkpoints")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    torch.set_num_threads(cfg.threads)  # this entry point: the one place its threads and allocator are set
    keep_freed_memory(cfg.keep_freed_memory)
    train_conditional_rpg(cfg, args.zoo, args.split, args.features, args.out)


if __name__ == "__main__":
    main()
