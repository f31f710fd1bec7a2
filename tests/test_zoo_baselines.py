"""Baselines and novelty (rpg.experiments.task_zoo.baselines) and their columns in the tables.

The columns of table16 / seen_summary are checked against an independent numpy computation (lstsq, plain loops
over tasks and bits, a numpy forward pass of the head) on a small zoo trained here: they must agree to 0.3 point.
Both hidden-unit orders are covered (`train.canonicalise` none, and sort as in the default profile: the reference
sorts each task's units by its mean head's readout difference itself). The baselines must not depend on the unseen
tasks' checkpoint files.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from rpg.config import load_config
from rpg.experiments.task_zoo.baselines import (BASELINES, TrainingZoo, affine_heads, complement_heads,
                                                compose_predictions, flatten_heads, mean_heads,
                                                nearest_heads, noise_heads, unflatten_heads)
from rpg.experiments.task_zoo.heads import HEAD_KEYS, checkpoint_path, evaluate_heads, save_zoo, train_heads
from rpg.experiments.task_zoo.pipeline import generate_and_evaluate, read_split, train_conditional_rpg, write_split
from rpg.experiments.task_zoo.tables import write_tables
from rpg.experiments.task_zoo.tasks import id_to_embedding
from rpg.utils import load_safetensors, save_safetensors_atomic

D = 8
K = 3
# 744 / 279 are the default flip pair (complements); 709 is 314's complement; 482 and 589 have none in training.
SEEN = [3, 5, 12, 33, 100, 255, 256, 300, 400, 709, 744, 1000]
UNSEEN = [279, 314, 482, 589]
TOL = 0.3  # points


# ----------------------------------------------------------------------------------------------------------------
# Independent reference computations (numpy, loops)
# ----------------------------------------------------------------------------------------------------------------


def np_bits(t: int) -> np.ndarray:
    return np.array([int(b) for b in format(t, "010b")], dtype=float)


def np_accuracy(head: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, t: int) -> tuple[float, float]:
    """Accuracy and balanced accuracy (percent) of one head on task t by a plain numpy forward pass."""
    h = x @ head["0.weight"].T + head["0.bias"]
    logits = (h / (1 + np.exp(-h))) @ head["2.weight"].T
    target = np_bits(t)[y].astype(int)
    correct = logits.argmax(1) == target
    pos = target == 1
    return 100 * correct.mean(), 50 * (correct[pos].mean() + correct[~pos].mean())


def np_unflatten(vec: np.ndarray) -> dict[str, np.ndarray]:
    sizes = {"0.weight": (D, D), "0.bias": (D,), "2.weight": (2, D)}
    out, i = {}, 0
    for k in HEAD_KEYS:
        n = int(np.prod(sizes[k]))
        out[k] = vec[i : i + n].reshape(sizes[k])
        i += n
    return out


def np_flat(head: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(head[k]).ravel() for k in HEAD_KEYS])


def np_sorted(heads: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The heads with hidden units ordered by the group's mean readout difference w2[1] - w2[0], descending."""
    w2 = np.mean([h["2.weight"] for h in heads], axis=0).astype(np.float64)
    order = np.argsort(-(w2[1] - w2[0]), kind="stable")
    return [{"0.weight": h["0.weight"][order], "0.bias": h["0.bias"][order], "2.weight": h["2.weight"][:, order]}
            for h in heads]


def np_task_checkpoints(zoo_dir, t: int, canonicalise: str) -> list[np.ndarray]:
    """Task t's checkpoints, flattened, in the gauge: read with the plain safetensors reader."""
    heads = [{key: load_safetensors(checkpoint_path(zoo_dir, t, k))[0][key].numpy() for key in HEAD_KEYS}
             for k in range(K)]
    return [np_flat(h) for h in (np_sorted(heads) if canonicalise == "sort" else heads)]


def np_train_heads(zoo_dir, canonicalise: str) -> dict[int, np.ndarray]:
    """Each training task's mean head in the gauge. {task: (P,)}"""
    return {t: np.mean(np_task_checkpoints(zoo_dir, t, canonicalise), axis=0) for t in SEEN}


def np_reference(zoo_dir, feats, train_ids, backbone, t: int, canonicalise: str) -> dict[str, float]:
    """Accuracy (percent) of every deterministic baseline for task t, computed independently."""
    means = np_train_heads(zoo_dir, canonicalise)
    ids = [s for s in SEEN if s in train_ids]
    design = np.array([[1.0, *(2 * np_bits(s) - 1)] for s in ids])
    coef, *_ = np.linalg.lstsq(design, np.stack([means[s] for s in ids]), rcond=None)
    heads = {"affine": np.array([1.0, *(2 * np_bits(t) - 1)]) @ coef,
             "mean": np.mean([means[s] for s in ids], axis=0)}
    dist = {s: sum(a != b for a, b in zip(format(s, "010b"), format(t, "010b"))) for s in ids}
    heads["nearest"] = np.mean([means[s] for s in ids if dist[s] == min(dist.values())], axis=0)
    if 1023 - t in ids:
        comp = np_unflatten(means[1023 - t].copy())
        comp["2.weight"] = comp["2.weight"][::-1]
        heads["complement"] = np.concatenate([comp[k].ravel() for k in HEAD_KEYS])
    x, y = feats["test_x"].numpy().astype(np.float64), feats["test_y"].numpy()
    out = {name: np_accuracy(np_unflatten(h), x, y, t)[0] for name, h in heads.items()}
    logits = x @ backbone["head.weight"].numpy().T + backbone["head.bias"].numpy()
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pred = (p[:, np_bits(t) == 1].sum(1) > 0.5).astype(int)
    out["compose"] = 100 * float((pred == np_bits(t)[y]).mean())
    return out


# ----------------------------------------------------------------------------------------------------------------
# A small trained zoo, a tiny RPG, generation and tables
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["none", "sort"])
def run(request, tmp_path_factory, repo_root):
    tmp = tmp_path_factory.mktemp(f"baselines_{request.param}")
    gen = torch.Generator().manual_seed(0)
    means = 2.0 * torch.randn(10, D, generator=gen)
    feats = {}
    for split, n in (("train", 600), ("val", 100), ("test", 300)):
        y = torch.arange(n) % 10
        feats[f"{split}_x"], feats[f"{split}_y"] = means[y] + torch.randn(n, D, generator=gen), y
    features = tmp / "features.safetensors"
    save_safetensors_atomic(feats, features, {"feature_dim": D})
    task_ids = sorted(SEEN + UNSEEN)
    stacked = train_heads(feats["train_x"], feats["train_y"], task_ids, steps=60, batch_size=64, lr=1e-2,
                          weight_decay=0.0, n_checkpoints=K, save_every=2, seed=0, progress=False)
    metrics = {"accuracy": torch.empty(len(task_ids), K), "balanced_accuracy": torch.empty(len(task_ids), K)}
    for k in range(K):
        m = evaluate_heads({key: v[:, k] for key, v in stacked.items()}, task_ids, feats["test_x"], feats["test_y"])
        metrics["accuracy"][:, k], metrics["balanced_accuracy"][:, k] = m["accuracy"], m["balanced_accuracy"]
    zoo = tmp / "zoo"
    save_zoo(zoo, stacked, task_ids, metrics, steps=[56, 58, 60], feature_dim=D, backbone="toy")
    backbone = tmp / "backbone.safetensors"  # a 10-class classifier on the features: nearest class mean
    save_safetensors_atomic({"head.weight": means, "head.bias": -0.5 * (means**2).sum(1)}, backbone, {})

    cfg = load_config([repo_root / "config" / "config.yaml", repo_root / "config" / "test.yaml"], overrides={
        "results_dir": str(tmp / "results"),
        "tasks": {"ids": task_ids, "unseen": UNSEEN, "table11": [id_to_embedding(t) for t in UNSEEN[1:3]], "n_val": 2,
                  "n_seen_eval": 4},
        "train": {"steps": 6, "eval_every": 6, "save_every": 6, "batch_size": 4, "diffusion_batch": 16,
                  "canonicalise": request.param},
        "generate": {"samples": 3, "seen_samples": 2},
        "logging": {"wandb": False, "progress": False},
    })
    split = tmp / "split.json"
    write_split(cfg, split)
    train_conditional_rpg(cfg, zoo, split, features, tmp / "rpg")
    out = tmp / "generated"
    generate_and_evaluate(cfg, tmp / "rpg" / "best.safetensors", split, features, zoo, out, backbone)
    tables = write_tables(cfg, out / "samples.csv", {})
    return {"cfg": cfg, "tmp": tmp, "zoo": zoo, "features": feats, "features_path": features, "split": split,
            "backbone": backbone, "out": out, "tables": tables,
            "samples": pd.read_csv(out / "samples.csv", dtype={"embedding": str})}


def test_baseline_columns_match_an_independent_computation(run):
    train_ids = set(read_split(run["split"]).train)
    backbone, _ = load_safetensors(run["backbone"])
    for name in ("table16", "seen_summary"):
        table = run["tables"][name]
        for _, row in table.iloc[:-1].iterrows():
            ref = np_reference(run["zoo"], run["features"], train_ids, backbone, int(row.task_id),
                               run["cfg"].train.canonicalise)
            for baseline in ("affine", "nearest", "complement", "mean", "compose"):
                if baseline in ref:
                    assert abs(row[f"{baseline}_acc"] - ref[baseline]) <= TOL, (name, row.task_id, baseline)
                else:
                    assert np.isnan(row[f"{baseline}_acc"]), (name, row.task_id, baseline)
            scores = [row[f"{b}_acc"] for b in BASELINES if not np.isnan(row[f"{b}_acc"])]
            # the tables are rounded to 3 decimals
            assert abs(row.best_baseline_acc - max(scores)) <= 2e-3
            assert abs(row.rpg_best_minus_baseline_acc - (row.rpg_best_acc - max(scores))) <= 2e-3
            assert row.best_baseline in BASELINES and abs(row[f"{row.best_baseline}_acc"] - max(scores)) <= 2e-3
    t16 = run["tables"]["table16"].set_index("task_id")
    assert np.isnan(t16.loc[482, "complement_acc"])  # ~482 = 541 is no task of this zoo


def test_original_best_and_novelty_columns(run):
    """original_best = the best of the task's checkpoints in the zoo index; rpg_l2_novelty = mean over the saved
    samples of the distance to the nearest training checkpoint (a plain loop)."""
    index = pd.read_csv(run["zoo"] / "index.csv")
    train_ids = read_split(run["split"]).train
    gauge = run["cfg"].train.canonicalise
    train = np.stack([c for t in train_ids for c in np_task_checkpoints(run["zoo"], t, gauge)])
    table = run["tables"]["table16"]
    for _, row in table.iloc[:-1].iterrows():
        t = int(row.task_id)
        assert abs(row.original_best_acc - 100 * index[index.task_id == t].test_accuracy.max()) <= TOL
        l2 = []
        for path in sorted(run["out"].glob(f"models/{t:04d}_s*.safetensors")):
            sd = {key: v.numpy() for key, v in load_safetensors(path)[0].items()}
            v = np_flat(np_sorted([sd])[0] if gauge == "sort" else sd)
            l2.append(min(np.linalg.norm(v - c) for c in train))
        assert row.rpg_l2_novelty == pytest.approx(np.mean(l2), rel=1e-3, abs=1e-3)
        assert 0 <= row.rpg_max_iou_original <= 1 and 0 <= row.rpg_pairwise_iou <= 1
        assert row.original_l2_novelty > 0  # an unseen original is no training checkpoint
    seen = run["tables"]["seen_summary"]
    assert (seen.iloc[:-1].original_l2_novelty > 0).all()  # the nearest *other* training checkpoint


def test_samples_csv_has_every_baseline_and_novelty(run):
    s = run["samples"]
    assert {"l2_novelty", "max_iou_original", "pairwise_iou"} <= set(s.columns)
    train = set(read_split(run["split"]).train)
    for group in ("unseen", "seen", "flip"):
        part = s[s.group == group]
        assert set(BASELINES) - {"complement"} <= set(part.kind)
        with_complement = {t for t in part.task_id if 1023 - t in train}
        assert set(part[part.kind == "complement"].task_id) == with_complement, group
    assert len(s[s.kind == "complement"]) > 0
    rpg = s[s.kind == "rpg"]
    assert rpg.l2_novelty.notna().all() and rpg.max_iou_original.notna().all()
    # the noise baseline sits at the novelty of RPG's samples (its source is a training checkpoint); in the sort
    # gauge a noisy head is re-sorted before it is measured, which can put it a little farther than its noise
    slack = 1e-4 if run["cfg"].train.canonicalise == "none" else 0.1
    for group, part in s.groupby("group"):
        noise = part[part.kind == "noise"].l2_novelty
        assert (noise <= part[part.kind == "rpg"].l2_novelty.mean() * (1 + slack)).all(), group
    t12 = write_tables(run["cfg"], run["out"] / "samples.csv", {})["table12"]
    assert t12.model.tolist()[:2] == ["original", "rpg"] and set(BASELINES) - {"complement"} <= set(t12.model)


def test_baselines_ignore_unseen_checkpoint_files(run):
    """Unseen tasks' checkpoints made wildly different: every baseline row and RPG's novelty stay identical."""
    r = run
    for t in UNSEEN:
        for k in range(K):
            path = checkpoint_path(r["zoo"], t, k)
            tensors, meta = load_safetensors(path)
            save_safetensors_atomic({key: 1000 * tensors[key] for key in HEAD_KEYS}, path, meta)
    out = r["tmp"] / "generated_again"
    generate_and_evaluate(r["cfg"], r["tmp"] / "rpg" / "best.safetensors", r["split"], r["features_path"], r["zoo"],
                          out, r["backbone"])
    again = pd.read_csv(out / "samples.csv", dtype={"embedding": str})
    cols = ["group", "kind", "task_id", "index", "accuracy", "balanced_accuracy", "l2_novelty"]
    before, after = (f[f.kind.isin([*BASELINES, "rpg"])][cols].reset_index(drop=True) for f in (r["samples"], again))
    pd.testing.assert_frame_equal(before, after)


# ----------------------------------------------------------------------------------------------------------------
# The functions on their own
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def toy_zoo() -> TrainingZoo:
    gen = torch.Generator().manual_seed(1)
    shapes = {"0.weight": torch.Size([3, 3]), "0.bias": torch.Size([3]), "2.weight": torch.Size([2, 3])}
    return TrainingZoo((3, 5, 12, 1020), torch.randn(4 * 2, 18, generator=gen), 2, shapes)


def test_flatten_round_trip(toy_zoo):
    sds = unflatten_heads(toy_zoo.checkpoints, toy_zoo.shapes)
    assert torch.equal(flatten_heads(sds), toy_zoo.checkpoints)


def test_head_baselines_by_hand(toy_zoo):
    m = toy_zoo.mean_heads
    assert torch.allclose(m[1], toy_zoo.checkpoints[2:4].mean(0))
    # 7 = 0000000111: Hamming 1 from 3 (0000000011) and 5 (0000000101), 2 from 12
    assert torch.allclose(nearest_heads(toy_zoo, [7])[0], (m[0] + m[1]) / 2)
    assert torch.allclose(nearest_heads(toy_zoo, [12])[0], m[2])  # a training task: itself
    comp = complement_heads(toy_zoo, [3, 7])  # 1020 = ~3
    expect = unflatten_heads(m[3][None], toy_zoo.shapes)[0]
    assert torch.allclose(comp[0], flatten_heads([{**expect, "2.weight": expect["2.weight"].flip(0)}])[0])
    assert comp[1].isnan().all()
    assert torch.allclose(mean_heads(toy_zoo, [7, 9]), m.mean(0).expand(2, -1))
    noisy = noise_heads(toy_zoo, [7, 13], l2=0.5, seed=0)  # 13 = 0000001101: one bit from 5 and from 12
    source = toy_zoo.checkpoints[[1, 3]]  # last checkpoints of tasks 3 and 5 (the lowest-id nearest ones)
    assert torch.allclose((noisy - source).norm(dim=1), torch.full((2,), 0.5), atol=1e-5)


def test_affine_fits_an_exactly_affine_zoo():
    ids = (3, 5, 12, 100, 255, 256, 300, 400, 511, 700, 900, 1000)
    gen = torch.Generator().manual_seed(2)
    coef = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    design = torch.tensor([[1.0, *(2 * np_bits(t) - 1)] for t in ids], dtype=torch.float64)
    zoo = TrainingZoo(ids, (design @ coef).float().repeat_interleave(2, 0), 2,
                      {"0.weight": torch.Size([1, 1]), "0.bias": torch.Size([1]), "2.weight": torch.Size([2, 2])})
    target = torch.tensor([[1.0, *(2 * np_bits(77) - 1)]], dtype=torch.float64)
    assert torch.allclose(affine_heads(zoo, [77]), (target @ coef).float(), atol=1e-4)


def test_compose_and_l2_by_hand(toy_zoo):
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    clf = {"weight": torch.zeros(10, 2), "bias": torch.zeros(10)}
    clf["weight"][0, 0] = clf["weight"][9, 1] = 10.0  # image 0 -> class 0 (airplane), image 1 -> class 9 (truck)
    pred = compose_predictions(clf, x, [1, 512])  # 1 = truck only, 512 = airplane only
    assert pred.tolist() == [[0, 1], [1, 0]]
    heads = toy_zoo.checkpoints[:2] + 0.0
    assert torch.allclose(toy_zoo.collection.novelty(heads), torch.zeros(2))
    own = toy_zoo.collection.novelty(heads, of_originals=True)
    expect = torch.cdist(heads, toy_zoo.checkpoints).sort(1).values[:, 1]
    assert torch.allclose(own, expect, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# The baselines as methods of the study's interface (rpg.experiments.task_zoo.methods)
# ----------------------------------------------------------------------------------------------------------------


def test_every_baseline_is_a_method_and_answers_as_the_function(toy_zoo, repo_root):
    from rpg.evaluation import list_baselines
    from rpg.experiments.task_zoo.baselines import baseline_heads
    from rpg.experiments.task_zoo.methods import FAMILY, MethodContext, TaskQuery, fitted_methods
    from rpg.experiments.task_zoo.tasks import task_condition

    assert list_baselines(FAMILY) == ["rpg", *BASELINES]
    targets = (7, 13, 3)
    query = TaskQuery(targets, task_condition(targets), n=4, seed=5, reference_l2=0.5)
    ctx = MethodContext(load_config(repo_root / "config" / "config.yaml"))  # no generator, no backbone: rpg and compose absent
    methods = fitted_methods(list_baselines(FAMILY), ctx, toy_zoo, task_condition(toy_zoo.task_ids))
    assert list(methods) == [b for b in BASELINES if b != "compose"]
    expected = baseline_heads(toy_zoo, targets, 0.5, 5)
    for name, method in methods.items():
        heads = method.generate(query)
        assert heads.shape == (3, 1, 18)  # one head per task, whatever n
        torch.testing.assert_close(heads[:, 0], expected[name], equal_nan=True, rtol=0, atol=0)


def test_method_answers_of_the_wrong_shape_are_refused(toy_zoo):
    from rpg.experiments.task_zoo.methods import TaskGenerator, TaskQuery
    from rpg.experiments.task_zoo.pipeline import method_models
    from rpg.experiments.task_zoo.tasks import task_condition

    class TooMany(TaskGenerator):
        def generate(self, query):
            return torch.zeros(len(query.task_ids), query.n + 1, 18)

    query = TaskQuery((7,), task_condition([7]), n=2, seed=0)
    with pytest.raises(ValueError, match="1 <= m <= 2"):
        method_models(None, "too_many", TooMany(), query, toy_zoo)
    with pytest.raises(NotImplementedError):
        TaskGenerator().generate(query)
