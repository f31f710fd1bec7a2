"""RPG-initialised fine-tuning with few labels (issue 31): the arms share one data order, RPG's sample is chosen on
the k training images only, the summary finds the smallest k within reach of the originals, and the notebook runs.
Everything on tiny synthetic domain features, heads and "generated" samples."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from rpg.config import load_config
from rpg.experiments.task_zoo import finetune_few as FF
from rpg.experiments.task_zoo.heads import (HEAD_KEYS, evaluate_heads, head_logits, initial_head, save_zoo,
                                            stack_state_dicts, train_heads)
from rpg.experiments.task_zoo.tasks import TaskSplit, binary_labels, domain_task_id
from rpg.utils import load_safetensors, save_safetensors_atomic

REPO = Path(__file__).resolve().parents[1]
D = 8
K = 2  # checkpoints per task
CLASS_SETS = [3, 5, 12, 33, 100, 255, 300, 709, 279, 314]
UNSEEN = [domain_task_id(279, 1), domain_task_id(314, 1)]
SAMPLES = 4


def _domain_features(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Two domains: class means + noise, and the same seen through a fixed random linear map."""
    means = 2.0 * torch.randn(10, D, generator=gen)
    shift = torch.randn(D, D, generator=gen) / D**0.5
    feats = {}
    for split, n in (("train", 400), ("val", 50), ("test", 300)):
        y = torch.arange(n) % 10
        x = means[y] + torch.randn(n, D, generator=gen)
        feats[f"{split}_x"], feats[f"{split}_y"] = torch.stack([x, x @ shift]), y
    return feats


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune_few")
    gen = torch.Generator().manual_seed(0)
    feats = _domain_features(gen)
    save_safetensors_atomic(feats, tmp / "features.safetensors", {"feature_dim": D})
    task_ids = sorted(domain_task_id(c, d) for c in CLASS_SETS for d in (0, 1))
    stacked = {}
    for d in (0, 1):
        ids = [t for t in task_ids if t // 1024 == d]
        part = train_heads(feats["train_x"][d], feats["train_y"], ids, steps=30, batch_size=64, lr=1e-2,
                           weight_decay=0.0, n_checkpoints=K, save_every=2, seed=0, progress=False)
        for key, v in part.items():
            stacked[key] = torch.cat([stacked[key], v]) if key in stacked else v
    metrics = {"accuracy": torch.zeros(len(task_ids), K), "balanced_accuracy": torch.zeros(len(task_ids), K)}
    save_zoo(tmp / "zoo", stacked, task_ids, metrics, steps=[28, 30], feature_dim=D, backbone="toy")
    split = TaskSplit(train=tuple(t for t in task_ids if t not in UNSEEN), val=(), unseen=tuple(UNSEEN))
    (tmp / "split.json").write_text(json.dumps(split.to_dict()))
    for t in UNSEEN:  # "generated" samples: the task's own original plus noise of growing size
        original = {key: stacked[key][task_ids.index(t), -1] for key in HEAD_KEYS}
        for s in range(SAMPLES):
            noisy = {key: v + (0.3 * s) * torch.randn(v.shape, generator=gen) for key, v in original.items()}
            save_safetensors_atomic(noisy, tmp / "models" / f"{t:04d}_s{s}.safetensors", {"task_id": t})
    cfg = load_config([REPO / "config" / "config.yaml", REPO / "config" / "test.yaml"], overrides={
        "results_dir": str(tmp / "results"),
        "domains": {"names": ["identity", "rot90"]},
        "zoo": {"n_checkpoints": K, "batch_size": 32, "lr": 1e-2},
        "study": {"finetune_few": {"shots": [4, 16, "all"], "steps": 12, "eval_steps": [0, 3]}},
    })
    frame = FF.finetune_few(cfg, tmp / "features.safetensors", tmp / "zoo", tmp / "split.json", tmp / "models")
    return {"tmp": tmp, "cfg": cfg, "feats": feats, "frame": frame}


def test_every_arm_k_and_step_with_the_originals_beside(run):
    frame, cfg = run["frame"], run["cfg"]
    per_task = frame[frame.task_id.astype(str) != "mean"]
    assert set(per_task.task_id.astype(int)) == set(UNSEEN)
    assert {"rpg", "affine", "nearest", "mean", "noise", "zoo_init", "fresh"} <= set(per_task.arm)
    assert {arm + "_early" for arm in ("rpg", "affine", "fresh")} <= set(per_task.arm)  # holdout 0.25 by default
    assert {arm + "_cv" for arm in ("rpg", "affine", "fresh")} <= set(per_task.arm)  # folds 4 by default
    chosen = per_task[per_task.arm.str.endswith(("_early", "_cv"))]
    assert set(chosen.step) == {12} and set(chosen.stop_step) <= {0, 3, 12} and chosen.stop_step.notna().all()
    assert per_task[~per_task.arm.str.endswith(("_early", "_cv"))].stop_step.isna().all()
    # a baseline that does not exist for a task is no arm of it: 314's complement (709) trains, 279's (744) not
    complement = per_task[per_task.arm == "complement"]
    assert set(complement.task_id.astype(int)) == {domain_task_id(314, 1)}
    assert list(dict.fromkeys(per_task.k)) == ["4", "16", "all"]
    assert sorted(per_task.step.unique()) == [0, 3, 12]
    assert set(per_task[per_task.k == "all"].n_images) == {400}
    mean = frame[frame.task_id.astype(str) == "mean"]
    assert len(mean) == len(per_task.groupby(["arm", "k", "step"]))
    # the originals are the zoo's own checkpoints of the task, on its own domain's test features
    zoo_sd = [load_safetensors(run["tmp"] / "zoo" / "checkpoints" / f"{UNSEEN[0]:04d}_{k}.safetensors")[0]
              for k in range(K)]
    m = evaluate_heads(stack_state_dicts(zoo_sd), [UNSEEN[0]] * K, run["feats"]["test_x"][1], run["feats"]["test_y"])
    got = per_task[per_task.task_id.astype(int) == UNSEEN[0]].original_accuracy.unique()
    assert got == pytest.approx([100 * float(m["accuracy"].mean())], abs=1e-3)
    # at step 0 the zoo_init and fresh arms are their initial heads, the same for every k
    step0 = per_task[(per_task.step == 0) & per_task.arm.isin(["zoo_init", "fresh"])]
    assert step0.groupby(["task_id", "arm"]).accuracy.nunique().max() == 1
    assert per_task.groupby(["task_id", "k"]).arm.nunique().groupby("task_id").nunique().max() == 1  # per task
    assert cfg.study.finetune_few.steps == 12


def test_rpg_sample_is_chosen_on_the_k_training_images_only(run, tmp_path):
    """The chosen sample is the best on the task's first k training rows (checked by hand), and scrambling the test
    images and labels changes no choice."""
    frame, cfg, feats = run["frame"], run["cfg"], run["feats"]
    rpg = frame[(frame.arm == "rpg") & (frame.task_id.astype(str) != "mean") & (frame.step == 0)]
    ff = cfg.study.finetune_few
    for row in rpg.itertuples():
        t = int(row.task_id)
        order = torch.randperm(400, generator=torch.Generator().manual_seed(cfg.seed + ff.seed_offset + t))
        rows = order if row.k == "all" else order[: int(row.k)]
        x, y = feats["train_x"][1][rows], binary_labels(feats["train_y"][rows], [t])[0]
        heads = [load_safetensors(run["tmp"] / "models" / f"{t:04d}_s{s}.safetensors")[0] for s in range(SAMPLES)]
        acc = [float((head_logits(stack_state_dicts([h]), x)[0].argmax(-1) == y).float().mean()) for h in heads]
        assert acc[int(row.sample)] == max(acc)
        assert row.select_accuracy == pytest.approx(100 * max(acc), abs=1e-3)
    scrambled = {**feats, "test_x": torch.randn_like(feats["test_x"]), "test_y": feats["test_y"].flip(0)}
    save_safetensors_atomic(scrambled, tmp_path / "features.safetensors", {"feature_dim": D})
    other = FF.finetune_few(cfg, tmp_path / "features.safetensors", run["tmp"] / "zoo", run["tmp"] / "split.json",
                            run["tmp"] / "models")
    pd.testing.assert_series_equal(other["sample"], frame["sample"])
    pd.testing.assert_series_equal(other["stop_step"], frame["stop_step"])  # so is the early-stopped step
    assert not other.accuracy.equals(frame.accuracy)  # the test images did change: only the scores moved


def test_arms_share_one_data_order():
    """Arms that start from the same head end at the same head, whatever else trains beside them: the minibatches
    are the stack's, not the arm's."""
    gen = torch.Generator().manual_seed(1)
    x, classes = torch.randn(40, D, generator=gen), torch.arange(40) % 10
    test_x, test_classes = torch.randn(60, D, generator=gen), torch.arange(60) % 10
    rec = FF.Recipe(steps=10, batch_size=8, lr=1e-2, weight_decay=0.0, eval_steps=(0, 5), task_chunk=2)
    same = initial_head(D, 5)
    starts = {"a": same, "b": initial_head(D, 6), "c": same, "d": initial_head(D, 7)}
    rows = pd.DataFrame(FF.finetune_arms(starts, x, classes, 279, test_x, test_classes, rec, seed=3))
    a, c = rows[rows.arm == "a"], rows[rows.arm == "c"]
    assert a.accuracy.tolist() == c.accuracy.tolist() and sorted(a.step) == [0, 5, 10]
    alone = pd.DataFrame(FF.finetune_arms({"a": same}, x, classes, 279, test_x, test_classes, rec, seed=3))
    assert alone.accuracy.tolist() == pytest.approx(a.accuracy.tolist())


def test_holdout_size():
    assert [FF.holdout_size(k, 0.25) for k in (1, 2, 4, 8, 32, 101)] == [0, 1, 1, 2, 8, 25]
    assert FF.holdout_size(8, 0.0) == 0 and FF.holdout_size(3, 0.5) == 2  # 1.5 rounds to 2; one image is kept


def _stopping_case(seed: int, k: int, **recipe):
    """k labelled images and 80 test images of random features, three starts and a 20-step recipe (`recipe`: its
    holdout or folds) for the tests of the recipes that choose their step."""
    gen = torch.Generator().manual_seed(seed)
    x, classes = torch.randn(k, D, generator=gen), torch.randint(0, 10, (k,), generator=gen)
    test_x, test_classes = torch.randn(80, D, generator=gen), torch.arange(80) % 10
    rec = FF.Recipe(steps=20, batch_size=4, lr=5e-2, weight_decay=0.0, eval_steps=(0, 2, 5, 10), task_chunk=2,
                    **recipe)
    starts = {"a": initial_head(D, 5), "b": initial_head(D, 6), "c": initial_head(D, 7)}
    return x, classes, test_x, test_classes, starts, rec


def test_early_stopped_arm_keeps_the_step_best_on_the_held_out_images():
    """The kept step is the best saved step on the last h of the k images (scored here by `finetune_arms` on them
    as its test set, the same training), and its test accuracy is that step's; every arm gets an `_early` row."""
    x, classes, test_x, test_classes, starts, rec = _stopping_case(4, 16, holdout=0.25)
    early = pd.DataFrame(FF.early_stopped_arms(starts, x, classes, 279, test_x, test_classes, rec, seed=3))
    assert early.arm.tolist() == ["a_early", "b_early", "c_early"] and set(early.step) == {20}
    fit, held = slice(0, 12), slice(12, 16)
    on_held = pd.DataFrame(FF.finetune_arms(starts, x[fit], classes[fit], 279, x[held], classes[held], rec, seed=3))
    on_test = pd.DataFrame(FF.finetune_arms(starts, x[fit], classes[fit], 279, test_x, test_classes, rec, seed=3))
    for row in early.itertuples():
        arm = row.arm.removesuffix("_early")
        held_acc = on_held[on_held.arm == arm].set_index("step").accuracy
        assert held_acc[row.stop_step] == held_acc.max()
        test_acc = on_test[(on_test.arm == arm) & (on_test.step == row.stop_step)].accuracy.item()
        assert row.accuracy == pytest.approx(test_acc, abs=1e-4)
    assert FF.early_stopped_arms(starts, x[:1], classes[:1], 279, test_x, test_classes, rec, seed=3) == []


def test_cross_validated_step_is_the_best_over_the_left_out_parts():
    """Each arm's chosen step has the most left-out images right over the parts (image i in part i mod parts;
    scored here by `finetune_arms` on each part as its test set, the same training); its `_cv` row is the fixed
    recipe's row on all k images at that step. Fewer than 2 parts: no choice."""
    x, classes, test_x, test_classes, starts, rec = _stopping_case(5, 12, folds=3)
    steps = FF.cross_validated_steps(starts, x, classes, 279, rec, seed=3)
    part = torch.arange(12) % 3
    right: dict[tuple[str, int], float] = {}
    for f in range(3):
        fit, held = part != f, part == f
        for r in FF.finetune_arms(starts, x[fit], classes[fit], 279, x[held], classes[held], rec, seed=3):
            key = (r["arm"], r["step"])
            right[key] = right.get(key, 0.0) + r["accuracy"] * int(held.sum()) / 100
    for arm, step in zip(starts, steps):
        assert right[(arm, step)] == pytest.approx(max(right[(arm, s)] for s in rec.save_at))
    curve = FF.finetune_arms(starts, x, classes, 279, test_x, test_classes, rec, seed=3)
    rows = FF.cross_validated_rows(curve, steps, list(starts), rec.steps)
    assert [r["arm"] for r in rows] == ["a_cv", "b_cv", "c_cv"] and {r["step"] for r in rows} == {20}
    for row, step in zip(rows, steps):
        fixed = next(r for r in curve if r["arm"] == row["arm"].removesuffix("_cv") and r["step"] == step)
        assert row["accuracy"] == fixed["accuracy"] and row["stop_step"] == step
    assert FF.base_arm("rpg_cv") == FF.base_arm("rpg_early") == FF.base_arm("rpg") == "rpg"
    assert FF.cross_validated_steps(starts, x[:1], classes[:1], 279, rec, seed=3) is None
    assert FF.cross_validated_steps(starts, x, classes, 279, dataclasses.replace(rec, folds=1), seed=3) is None


def test_train_heads_from_given_heads_returns_the_start_and_leaves_it_alone():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(30, D, generator=gen), torch.arange(30) % 10
    start = stack_state_dicts([initial_head(D, 1), initial_head(D, 2)])
    before = {k: v.clone() for k, v in start.items()}
    out = train_heads(x, y, [279, 314], steps=6, batch_size=8, lr=1e-2, weight_decay=0.0, seed=0, progress=False,
                      start=start, save_at=[0, 6])
    for k in HEAD_KEYS:
        assert torch.equal(start[k], before[k]) and torch.equal(out[k][:, 0], before[k])
        assert not torch.equal(out[k][:, 1], before[k])


def test_images_needed_is_the_smallest_k_within_reach():
    rows = []
    for arm, accs in {"rpg": [74.5, 75.5, 76.0], "fresh": [50.0, 60.0, 75.2], "mean": [60.0, 61.0, 62.0]}.items():
        for (k, n), acc in zip([("8", 8), ("32", 32), ("all", 100)], accs):
            rows.append({"task_id": "mean", "arm": arm, "k": k, "n_images": n, "step": 10, "accuracy": acc,
                         "original_accuracy": 76.0, "minus_original": acc - 76.0, "n_tasks": 20})
    out = FF.images_needed(pd.DataFrame(rows), within=1.0).set_index("arm")
    assert out.needs.to_dict() == {"rpg": "32", "fresh": "all", "mean": "none"}
    assert out.loc["rpg", "k=8"] == 74.5 and out.loc["rpg", "original"] == 76.0


def test_finetune_few_notebook_committed_clean_and_executes(run, tmp_path):
    import nbformat

    nb = nbformat.read(REPO / "notebooks" / "finetune_few.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []) and "require_inputs" in code[1].source
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    from jupyter_client.kernelspec import KernelSpecManager

    if "rpg" not in KernelSpecManager().find_kernel_specs():
        pytest.skip("Jupyter kernel 'rpg' not installed (make install)")
    from rpg.experiments.notebooks import execute_notebook

    csv, summary = tmp_path / "finetune_few.csv", tmp_path / "finetune_few.summary.csv"
    run["frame"].to_csv(csv, index=False)
    FF.images_needed(run["frame"], 1.0).to_csv(summary, index=False)
    execute_notebook(REPO / "notebooks" / "finetune_few.ipynb", tmp_path / "nb.ipynb",
                     {"finetune_csv": str(csv), "summary_csv": str(summary), "out_dir": str(tmp_path / "fig")})
    png = tmp_path / "fig" / "finetune_few.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "rpg" in set(pd.read_csv(tmp_path / "fig" / "finetune_few.csv").arm)


def test_finetune_few_dry_run(tmp_path, snakemake_cli):
    """`snakemake -n finetune_few` plans the regime's stages, the fine-tuning and its notebook, nothing of table11."""
    proc = snakemake_cli("-n", "--cores", "2", "finetune_few", "--config", f"results_dir={tmp_path / 'results'}",
                         f"data={{root: {tmp_path}, download: true}}", "study={regimes: [domains_few]}", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "study/domains_few/finetune_few.csv" in proc.stdout and "notebook_finetune_few" in proc.stdout
    assert "table11.csv" not in proc.stdout
