"""The evaluation layer (rpg.evaluation): the registry of baselines, the best-baseline rule, the exact novelty."""

from __future__ import annotations

import math

import pytest
import torch

import rpg.experiments.arch_study.baselines  # noqa: F401  registers family "collection"
import rpg.experiments.task_zoo.baselines  # noqa: F401  registers family "task"
from rpg import evaluation as ev


def test_each_family_lists_its_baselines_in_drawing_order():
    assert ev.list_baselines("task") == ["affine", "nearest", "complement", "mean", "noise", "compose"]
    assert ev.list_baselines("collection") == ["noise", "average16", "gaussian"]
    assert {"task/noise", "collection/noise"} <= set(ev.list_baselines())  # one name, two families
    assert ev.list_baselines("no_such_family") == []


def test_unknown_names_raise_a_clear_error():
    with pytest.raises(RuntimeError, match="unknown baseline 'noisy' of family 'collection'.*average16"):
        ev.get_baseline("noisy", "collection")
    with pytest.raises(RuntimeError, match="unknown baseline family 'zoo'"):
        ev.create_baseline("noise", "zoo")


def test_register_create_and_replace_with_a_warning():
    @ev.register_baseline("test_family")
    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n)

    assert ev.get_baseline("zeros", "test_family") is zeros
    assert torch.equal(ev.create_baseline("zeros", "test_family", 3), torch.zeros(3))
    with pytest.warns(UserWarning, match="registered again"):
        ev.register_baseline("test_family", "zeros")(lambda n: torch.ones(n))
    assert torch.equal(ev.create_baseline("zeros", "test_family", 2), torch.ones(2))


def test_collection_baselines_draw_in_turn_from_one_generator():
    """baseline_points = each registered baseline called in order on one generator (the draws of Table 1)."""
    from rpg.experiments.arch_study.baselines import baseline_points
    from rpg.weightspace import gaussian_samples, noise_at_distance, random_averages

    points = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    got = baseline_points(points, 4, 0.3, seed=11)
    gen = torch.Generator().manual_seed(11)
    expect = {"noise": noise_at_distance(points[torch.randint(0, 5, (4,), generator=gen)], 0.3, gen),
              "average16": random_averages(points, 4, 16, gen), "gaussian": gaussian_samples(points, 4, gen)}
    assert list(got) == list(expect)
    for name in expect:
        assert torch.equal(got[name], expect[name]), name


def test_best_baseline_skips_absent_ones_and_keeps_the_first_maximum():
    assert ev.best_baseline({"a": 1.0, "b": float("nan"), "c": 3.0, "d": 3.0}) == ("c", 3.0)
    name, score = ev.best_baseline({"a": float("nan")})
    assert name == "" and math.isnan(score)
    assert ev.best_baseline({}) == ("", pytest.approx(float("nan"), nan_ok=True))


def test_column_vocabulary():
    assert ev.acc_column("rpg", "mean") == "rpg_mean_acc" and ev.acc_column("affine") == "affine_acc"
    assert ev.acc_column("original", "best", "bal_acc") == "original_best_bal_acc"
    assert ev.novelty_column("rpg", ev.L2_NOVELTY) == "rpg_l2_novelty"
    assert ev.best_baseline_column() == "best_baseline_acc"
    assert ev.minus_baseline_column("best") == "rpg_best_minus_baseline_acc"


def test_novelty_is_exact_and_skips_the_point_itself():
    """An exact copy is at 0 (torch.cdist's matrix product leaves ~1e-3 at this scale in float32); the nearest of
    many is found through the shortlist; self_tolerance skips a copy wherever it sits in the reference (in float64,
    as the task zoo measures: the shortlist's distance of a copy must fall under the tolerance)."""
    gen = torch.Generator().manual_seed(0)
    ref = 100 + torch.randn(40, 3000, generator=gen)
    copies = ref[[5, 17]]
    assert torch.equal(ev.l2_novelty(copies, ref), torch.zeros(2))
    full = torch.stack([(ref - p).norm(dim=1) for p in ref])
    own = ev.l2_novelty(ref, ref, exclude_self=True)
    assert torch.allclose(own, (full + torch.diag(torch.full((40,), float("inf")))).min(1).values)
    skipped = ev.l2_novelty(copies.double(), ref.double(), self_tolerance=1e-6)
    assert torch.allclose(skipped, own[[5, 17]].double()) and (skipped > 0).all()
    assert torch.isinf(ev.l2_novelty(ref[:1], ref[:1], exclude_self=True)).all()  # no other checkpoint
    assert ev.l2_novelty(ref[:0], ref).shape == (0,)


def test_sample_rows_measure_every_family_the_same_way():
    """One builder: accuracy, l2_novelty against the collection, max IoU against the task's originals (an original
    against the others), pairwise IoU and spread within a kind, task by task; identity columns and metrics in order."""
    labels = torch.tensor([0, 1, 0, 1])
    orig_preds = torch.tensor([[0, 1, 0, 0], [0, 1, 1, 1], [1, 1, 0, 1]])  # wrong on {3}, {2}, {0}
    points = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    originals = ev.Models(ev.KIND_ORIGINAL, orig_preds, labels, points)
    rows = ev.SampleRows(originals, ev.Collection(points, originals_inside=True), pairwise_iou=True, l2_spread=True)
    own = rows.rows(originals)
    assert own[ev.L2_NOVELTY].tolist() == [3.0, 3.0, 4.0]  # nearest *other* checkpoint
    assert own[ev.MAX_IOU_ORIGINAL].tolist() == [0.0, 0.0, 0.0]  # disjoint mistakes
    gen = ev.Models(ev.KIND_RPG, torch.tensor([[0, 1, 0, 0], [0, 1, 0, 0]]), labels, torch.tensor([[0.0, 1.0]] * 2),
                    columns={"task_id": [7, 7]}, metrics={"extra": torch.tensor([0.5, 0.25])})
    frame = rows.rows(gen)
    assert list(frame.columns) == [ev.KIND, "task_id", "index", ev.ACCURACY, "extra", ev.L2_NOVELTY,
                                   ev.MAX_IOU_ORIGINAL, ev.PAIRWISE_IOU, ev.L2_SPREAD]
    assert frame[ev.ACCURACY].tolist() == [0.75, 0.75]
    assert frame[ev.L2_NOVELTY].tolist() == [1.0, 1.0]
    assert frame[ev.MAX_IOU_ORIGINAL].tolist() == [1.0, 1.0]  # a copy of original 0's mistakes
    assert frame[ev.PAIRWISE_IOU].tolist() == [1.0, 1.0] and frame[ev.L2_SPREAD].tolist() == [0.0, 0.0]
    lonely = ev.SampleRows(ev.Models(ev.KIND_ORIGINAL, orig_preds[:1], labels, points[:1]),
                           ev.Collection(points[:1], originals_inside=True))
    assert lonely.rows(lonely.originals)[[ev.L2_NOVELTY, ev.MAX_IOU_ORIGINAL]].isna().all().all()
    wide = ev.samples_table([own, frame], float_dtype="float64")
    assert wide[ev.L2_NOVELTY].dtype == "float64" and len(wide) == 5


def test_register_spec_adds_a_callable_from_outside_the_package(tmp_path, monkeypatch):
    import rpg.experiments.task_zoo.methods  # noqa: F401  registers family "task_method"

    (tmp_path / "outside_methods.py").write_text(
        "def make(ctx):\n    return ctx\n\n\nclass Named:\n    name = 'my_method'\n\n\n"
        "def affine(ctx):\n    return None\n\n\nnot_callable = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert ev.register_spec("test_outside", "outside_methods:make") == "make"
    assert ev.create_baseline("make", "test_outside", 7) == 7
    assert ev.register_spec("test_outside", "outside_methods:Named") == "my_method"
    assert ev.register_spec("test_outside", "outside_methods:Named") == "my_method"  # the same again: no change
    with pytest.raises(ValueError, match="already a task_method method"):  # never replaces a built-in
        ev.register_spec("task_method", "outside_methods:affine")
    with pytest.raises(ValueError, match="not a 'module:callable'"):
        ev.register_spec("test_outside", "outside_methods.make")
    with pytest.raises(ValueError, match="cannot load"):
        ev.register_spec("test_outside", "outside_methods:missing")
    with pytest.raises(ValueError, match="not callable"):
        ev.register_spec("test_outside", "outside_methods:not_callable")
