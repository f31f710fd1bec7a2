"""The classifier zoo (rpg.experiments.task_zoo.heads) and the task definitions (rpg.experiments.task_zoo.tasks): batched == one-at-a-time, shared init,
label bit order, the split, the zoo on disk, metrics.

Tolerance: batched vs single-task training agree within atol 1e-5 (float32, summation order differs).
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from rpg.experiments.task_zoo.tasks import (ALL_TASK_IDS, CIFAR10_CLASSES, TaskSplit, binary_labels, embedding_bits, id_to_embedding,
                       make_split, positive_classes)
from rpg.utils import CheckpointError, save_safetensors_atomic
from rpg.experiments.task_zoo.heads import (HEAD_KEYS, binary_metrics, checkpoint_path, evaluate_heads, initial_head, load_task_checkpoints,
                     make_head, predict, save_steps, save_zoo, stack_state_dicts, task_metrics, train_head_single,
                     train_heads)

D = 12
TASKS = [3, 512, 100, 1001, 341]


@pytest.fixture(scope="module")
def features():
    """Class-dependent random features: class c has its own mean, so binary tasks are learnable."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 10
    means = 2.0 * torch.randn(10, D, generator=gen)
    x = means[labels] + torch.randn(400, D, generator=gen)
    return x, labels


def _train_kwargs(**overrides):
    kw = dict(steps=30, batch_size=32, lr=3e-3, weight_decay=0.01, seed=7)
    kw.update(overrides)
    return kw


def test_batched_training_equals_single_task_loop(features):
    """train_heads (all tasks in one vectorised computation, in chunks too) == train_head_single task by task."""
    x, y = features
    kw = _train_kwargs()
    for chunk in (len(TASKS), 2):
        stacked = train_heads(x, y, TASKS, n_checkpoints=3, save_every=4, task_chunk=chunk, progress=False, **kw)
        assert save_steps(kw["steps"], 3, 4)[-1] == kw["steps"]
        for key in HEAD_KEYS:
            assert stacked[key].shape[:2] == (len(TASKS), 3)
        labels = binary_labels(y, TASKS)
        for i, task in enumerate(TASKS):
            single = train_head_single(x, labels[i], **kw)
            for key in HEAD_KEYS:
                torch.testing.assert_close(stacked[key][i, -1], single[key], atol=1e-5, rtol=0,
                                           msg=lambda m, k=key, t=task: f"task {t}, {k}: {m}")


def test_save_steps():
    assert save_steps(30, 3, 4) == [22, 26, 30]
    assert save_steps(5, 1, 100) == [5]
    with pytest.raises(ValueError, match="steps"):
        save_steps(5, 3, 10)


def test_checkpoints_are_distinct_training_snapshots(features):
    """The K saved checkpoints of a task differ (saved at different steps), and later ones fit better."""
    x, y = features
    stacked = train_heads(x, y, TASKS, n_checkpoints=3, save_every=10, progress=False, **_train_kwargs(steps=60))
    for k in range(2):
        assert not torch.equal(stacked["0.weight"][:, k], stacked["0.weight"][:, k + 1])
    acc = evaluate_heads({key: v[:, -1] for key, v in stacked.items()}, TASKS, x, y)["accuracy"]
    assert (acc > 0.85).all(), acc


def test_all_tasks_start_from_the_same_initial_head(features):
    """With lr = 0 every task's checkpoint is the shared initial head; the init is seeded and reproducible."""
    x, y = features
    init = initial_head(D, seed=5)
    again = initial_head(D, seed=5)
    assert all(torch.equal(init[k], again[k]) for k in init)
    assert not torch.equal(init["0.weight"], initial_head(D, seed=6)["0.weight"])
    assert set(init) == set(HEAD_KEYS) == set(make_head(D).state_dict())
    stacked = train_heads(x, y, TASKS, steps=3, batch_size=16, lr=0.0, weight_decay=0.0, n_checkpoints=1,
                          save_every=1, seed=5, progress=False)
    for key in HEAD_KEYS:
        for i in range(len(TASKS)):
            assert torch.equal(stacked[key][i, 0], init[key]), key
    # after one real step the tasks differ only through their labels
    one = train_heads(x, y, [3, 3, 512], steps=1, batch_size=16, lr=1e-2, weight_decay=0.0, n_checkpoints=1,
                      save_every=1, seed=5, progress=False)
    assert torch.allclose(one["2.weight"][0, 0], one["2.weight"][1, 0], atol=1e-7)
    assert not torch.allclose(one["2.weight"][0, 0], one["2.weight"][2, 0])


def test_zoo_training_is_deterministic(features):
    """Same seed -> identical tensors (torch.equal); another seed -> different heads."""
    x, y = features
    a = train_heads(x, y, TASKS, n_checkpoints=2, save_every=3, progress=False, **_train_kwargs(steps=15))
    b = train_heads(x, y, TASKS, n_checkpoints=2, save_every=3, progress=False, **_train_kwargs(steps=15))
    c = train_heads(x, y, TASKS, n_checkpoints=2, save_every=3, progress=False, **_train_kwargs(steps=15, seed=8))
    for key in HEAD_KEYS:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["0.weight"], c["0.weight"])


# ---------------------------------------------------------------------------------------------------------------
# Tasks and labels
# ---------------------------------------------------------------------------------------------------------------


def test_binary_labels_bit_order():
    """Bit i from the left is CIFAR-10 class i: task 3 = ship or truck, task 512 = airplane, 1 = truck."""
    classes = torch.arange(10)
    labels = binary_labels(classes, [3, 512, 1, 768, 1022])
    assert labels[0].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert labels[1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert labels[2].tolist() == [0] * 9 + [1]
    assert labels[3].tolist() == [1, 1] + [0] * 8
    assert labels[4].tolist() == [1] * 9 + [0]
    assert positive_classes(id_to_embedding(3)) == ["ship", "truck"]
    assert positive_classes(id_to_embedding(512)) == ["airplane"]
    assert embedding_bits([3]).tolist() == [[0.0] * 8 + [1.0, 1.0]]
    assert len(ALL_TASK_IDS) == 1022 and ALL_TASK_IDS[0] == 1 and ALL_TASK_IDS[-1] == 1022
    assert CIFAR10_CLASSES[0] == "airplane" and CIFAR10_CLASSES[-1] == "truck"


PAPER_UNSEEN = [314, 482, 589, 197, 462, 111, 101, 278, 793, 279, 653, 238, 1001, 141, 884, 592, 502, 643, 383, 128]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_never_puts_unseen_in_train_or_val(seed):
    split = make_split(ALL_TASK_IDS, PAPER_UNSEEN, n_val=20, seed=seed)
    train, val, unseen = set(split.train), set(split.val), set(split.unseen)
    assert unseen == set(PAPER_UNSEEN)
    assert not (train & unseen) and not (val & unseen) and not (train & val)
    assert train | val | unseen == set(ALL_TASK_IDS)
    assert len(val) == 20 and len(train) == 1022 - 20 - 20
    assert make_split(ALL_TASK_IDS, PAPER_UNSEEN, n_val=20, seed=seed) == split  # seeded
    assert TaskSplit.from_dict(split.to_dict()) == split


def test_split_differs_by_seed():
    a = make_split(ALL_TASK_IDS, PAPER_UNSEEN, n_val=20, seed=0)
    b = make_split(ALL_TASK_IDS, PAPER_UNSEEN, n_val=20, seed=1)
    assert a.val != b.val and a.unseen == b.unseen


# ---------------------------------------------------------------------------------------------------------------
# The zoo on disk
# ---------------------------------------------------------------------------------------------------------------


def test_save_and_load_zoo_round_trip(features, tmp_path):
    x, y = features
    tasks = [3, 512, 1001]
    stacked = train_heads(x, y, tasks, n_checkpoints=2, save_every=5, progress=False, **_train_kwargs(steps=20))
    metrics = {"accuracy": torch.rand(3, 2), "balanced_accuracy": torch.rand(3, 2)}
    index = save_zoo(tmp_path, stacked, tasks, metrics, steps=[15, 20], feature_dim=D, backbone="toy")
    assert len(index) == 6 and (tmp_path / "index.csv").is_file()
    csv = pd.read_csv(tmp_path / "index.csv", dtype={"embedding": str})
    assert csv.task_id.tolist() == [3, 3, 512, 512, 1001, 1001]
    assert csv.embedding.tolist()[2] == "1000000000"
    sds, metas = load_task_checkpoints(tmp_path, [512, 3], 2)  # any order, task-major
    assert [m["task_id"] for m in metas] == [512, 512, 3, 3]
    assert [m["checkpoint"] for m in metas] == [0, 1, 0, 1]
    for sd, meta in zip(sds, metas):
        i, k = tasks.index(meta["task_id"]), meta["checkpoint"]
        assert set(sd) == set(HEAD_KEYS)
        for key in HEAD_KEYS:
            assert torch.equal(sd[key], stacked[key][i, k])
        assert meta["embedding"] == id_to_embedding(meta["task_id"])  # a string, also when it starts with 1
        assert isinstance(meta["embedding"], str)
        assert meta["positive_classes"] == positive_classes(meta["embedding"])
        assert meta["step"] == [15, 20][k] and meta["feature_dim"] == D and meta["backbone"] == "toy"
        assert meta["test_accuracy"] == pytest.approx(float(metrics["accuracy"][i, k]))
        assert meta["arch"] == "binary_head"
    stacked_back = stack_state_dicts(sds)
    assert stacked_back["0.weight"].shape == (4, D, D)


def test_load_task_checkpoints_checks_metadata_and_missing(features, tmp_path):
    x, y = features
    stacked = train_heads(x, y, [3], n_checkpoints=1, save_every=1, progress=False, **_train_kwargs(steps=2))
    save_zoo(tmp_path, stacked, [3], {"accuracy": torch.ones(1, 1), "balanced_accuracy": torch.ones(1, 1)},
             steps=[2], feature_dim=D, backbone="toy")
    with pytest.raises(CheckpointError, match=str(checkpoint_path(tmp_path, 5, 0))):
        load_task_checkpoints(tmp_path, [5], 1)
    wrong = checkpoint_path(tmp_path, 6, 0)
    save_safetensors_atomic({k: stacked[k][0, 0] for k in HEAD_KEYS}, wrong, {"task_id": 7})
    with pytest.raises(CheckpointError, match="task 7"):
        load_task_checkpoints(tmp_path, [6], 1)


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def test_balanced_accuracy_of_constant_predictor_is_half():
    """A constant prediction has balanced accuracy 50 % whatever the class balance; plain accuracy = its class share."""
    target = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]])
    for value in (0, 1):
        pred = torch.full_like(target, value)
        m = binary_metrics(pred, target)
        assert m["balanced_accuracy"].tolist() == [0.5, 0.5]
        share = (target == value).float().mean(1)
        assert torch.allclose(m["accuracy"], share)
    perfect = binary_metrics(target.clone(), target)
    assert perfect["accuracy"].tolist() == [1.0, 1.0] and perfect["balanced_accuracy"].tolist() == [1.0, 1.0]
    inverted = binary_metrics(1 - target, target)
    assert inverted["balanced_accuracy"].tolist() == [0.0, 0.0]


def test_task_metrics_per_class():
    classes = torch.arange(10).repeat(3)  # 30 images, 3 per class
    pred = binary_labels(classes, [3]).clone()
    pred[0, classes == 8] = 0  # all ships wrong
    m = task_metrics(pred, classes, [3])
    assert m["per_class"].shape == (1, 10)
    assert m["per_class"][0, 8].item() == 0.0 and m["per_class"][0, 9].item() == 1.0
    assert m["accuracy"].item() == pytest.approx(27 / 30)
    assert m["balanced_accuracy"].item() == pytest.approx(0.5 * (0.5 + 1.0))


def test_predict_matches_nn_module(features):
    """The stacked einsum head == nn.Sequential head, sample by sample."""
    x, _ = features
    heads = [make_head(D) for _ in range(3)]
    stacked = stack_state_dicts([h.state_dict() for h in heads])
    pred = predict(stacked, x, chunk=2)
    for i, h in enumerate(heads):
        with torch.no_grad():
            assert torch.equal(pred[i], h(x).argmax(-1))


def test_hand_written_head_gradients_match_autograd():
    """rpg.experiments.task_zoo.heads._head_grads (the batched path's manual backward) == autograd on head_logits + cross-entropy."""
    from rpg.experiments.task_zoo.heads import _head_grads, head_logits

    gen = torch.Generator().manual_seed(3)
    t, d, b = 3, 6, 20
    params = {"0.weight": torch.randn(t, d, d, generator=gen, dtype=torch.float64),
              "0.bias": torch.randn(t, d, generator=gen, dtype=torch.float64),
              "2.weight": torch.randn(t, 2, d, generator=gen, dtype=torch.float64)}
    x = torch.randn(b, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (t, b), generator=gen)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss = torch.nn.functional.cross_entropy(head_logits(leaves, x).reshape(-1, 2), y.reshape(-1), reduction="sum") / b
    loss.backward()
    *grads, z = _head_grads(params["0.weight"], params["0.bias"], params["2.weight"], x, y.T.double())
    for key, g in zip(HEAD_KEYS, grads):
        torch.testing.assert_close(g, leaves[key].grad, rtol=0, atol=1e-12, msg=key)
    logits = head_logits(params, x)
    torch.testing.assert_close(z, (logits[..., 1] - logits[..., 0]).T, rtol=0, atol=1e-12)


def test_on_step_reports_mean_task_loss_in_chunks(features):
    """With lr = 0 the reported loss is the shared initial head's mean cross-entropy over tasks, chunked or not."""
    x, y = features
    kw = dict(steps=10, batch_size=16, lr=0.0, weight_decay=0.0, n_checkpoints=1, save_every=1, seed=5,
              progress=False)
    gen = torch.Generator().manual_seed(kw["seed"] + 1)
    idx = [torch.randint(0, x.shape[0], (kw["batch_size"],), generator=gen) for _ in range(kw["steps"])][-1]
    head = make_head(D)
    head.load_state_dict(initial_head(D, kw["seed"]))
    labels = binary_labels(y, TASKS)
    with torch.no_grad():
        expected = sum(torch.nn.functional.cross_entropy(head(x[idx]), labels[i, idx]).item()
                       for i in range(len(TASKS))) / len(TASKS)
    for chunk in (len(TASKS), 2):
        logged = {}
        train_heads(x, y, TASKS, task_chunk=chunk, on_step=lambda s, loss: logged.__setitem__(s, loss), **kw)
        assert sorted(logged) == [10]
        assert abs(logged[10] - expected) < 1e-5, (chunk, logged, expected)
