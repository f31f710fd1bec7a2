"""The study of regimes (issue 13): per-task initialisation, the smaller / neighbour-free splits, canonical hidden-unit
orders, the regime configs, the gathering of unseen_study.csv and the `unseen_study` DAG."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import yaml
import torch
from conftest import copied_stages_that_ran, dag_upstream_copy

from rpg.config import load_config
from rpg.experiments.rules import config_setting
from rpg.experiments.task_zoo import study as S
from rpg.experiments.task_zoo.baselines import BASELINES
from rpg.experiments.task_zoo.canonical import (
    Gauge,
    match_permutation,
    permute_hidden,
    unit_features,
)
from rpg.experiments.task_zoo.heads import (
    HEAD_KEYS,
    head_logits,
    initial_head,
    initial_heads,
    train_head_single,
    train_heads,
)
from rpg.experiments.task_zoo.tables import seen_summary, unseen_table
from rpg.experiments.task_zoo.tasks import (
    ALL_TASK_IDS,
    TaskSplit,
    binary_labels,
    make_split,
    neighbours,
)

REPO = Path(__file__).resolve().parents[1]
D = 12
UNSEEN = [314, 482, 589, 197, 462, 111, 101, 278, 793, 279, 653, 238, 1001, 141, 884, 592, 502, 643, 383, 128]


def _features(n: int = 400):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 10
    return 2.0 * torch.randn(10, D, generator=gen)[labels] + torch.randn(n, D, generator=gen), labels


# ----------------------------------------------------------------------------------------------------------------
# zoo.init
# ----------------------------------------------------------------------------------------------------------------


def test_initial_heads_shared_vs_per_task():
    shared = initial_heads(D, 3, [5, 7, 9], "shared")
    per_task = initial_heads(D, 3, [5, 7, 9], "per_task")
    for k in HEAD_KEYS:
        assert torch.equal(shared[k][0], shared[k][2]) and torch.equal(shared[k][0], initial_head(D, 3)[k])
        assert not torch.equal(per_task[k][0], per_task[k][1])
        # a task's own head depends on its id, not on which other tasks are configured
        assert torch.equal(per_task[k][1], initial_heads(D, 3, [7], "per_task")[k][0])
        assert not torch.equal(per_task[k][0], shared[k][0])
    with pytest.raises(ValueError, match="init"):
        initial_heads(D, 3, [5], "perfect")


def test_per_task_batched_training_equals_single_task_loop():
    """Still one vectorised computation: task i equals train_head_single from task i's own initial head."""
    x, y = _features()
    tasks = [3, 512, 100]
    kw = {"steps": 20, "batch_size": 32, "lr": 3e-3, "weight_decay": 0.01, "seed": 7}
    stacked = train_heads(x, y, tasks, n_checkpoints=2, save_every=3, task_chunk=2, init="per_task", progress=False,
                          **kw)
    starts = initial_heads(D, 7, tasks, "per_task")
    labels = binary_labels(y, tasks)
    for i in range(len(tasks)):
        single = train_head_single(x, labels[i], init_state={k: v[i] for k, v in starts.items()}, **kw)
        for k in HEAD_KEYS:
            torch.testing.assert_close(stacked[k][i, -1], single[k], atol=1e-5, rtol=0)
    shared = train_heads(x, y, tasks, n_checkpoints=2, save_every=3, progress=False, **kw)
    assert not torch.allclose(shared["0.weight"][:, -1], stacked["0.weight"][:, -1])


# ----------------------------------------------------------------------------------------------------------------
# Split: tasks.n_seen and tasks.holdout_neighbours
# ----------------------------------------------------------------------------------------------------------------


def test_n_seen_draws_a_subset_and_keeps_validation():
    full = make_split(ALL_TASK_IDS, UNSEEN, 10, seed=0)
    small = make_split(ALL_TASK_IDS, UNSEEN, 10, seed=0, n_seen=64)
    assert len(small.train) == 64 and set(small.train) < set(full.train)
    assert small.val == full.val and small.unseen == full.unseen
    assert set(small.excluded) == set(full.train) - set(small.train)
    assert make_split(ALL_TASK_IDS, UNSEEN, 10, seed=0, n_seen=64) == small  # seeded
    assert make_split(ALL_TASK_IDS, UNSEEN, 10, seed=1, n_seen=64).train != small.train
    with pytest.raises(ValueError, match="n_seen"):
        make_split(ALL_TASK_IDS, UNSEEN, 10, seed=0, n_seen=5000)
    assert TaskSplit.from_dict(small.to_dict()) == small


def test_holdout_neighbours_removes_one_bit_neighbours_and_complements():
    assert neighbours([3]) == {2, 1, 7, 11, 19, 35, 67, 131, 259, 515, 1020}  # 0000000011: 10 flips (0 dropped) + ~
    split = make_split(ALL_TASK_IDS, UNSEEN, 10, seed=0, holdout_neighbours=True)
    kept = set(split.train) | set(split.val)
    for u in UNSEEN:
        for t in kept:
            assert (u ^ t).bit_count() > 1, (u, t)
            assert t != 1023 - u
    default = make_split(ALL_TASK_IDS, UNSEEN, 10, seed=0)
    assert any((u ^ t).bit_count() == 1 for u in UNSEEN for t in default.train)  # the default split has them
    assert set(split.excluded) == neighbours(UNSEEN) - set(UNSEEN)
    assert set(split.train) | set(split.val) | set(split.unseen) | set(split.excluded) == set(ALL_TASK_IDS)


def test_shifted_domain_tasks_keeps_k_per_shifted_domain_and_every_plain_task():
    from rpg.experiments.task_zoo.tasks import TaskError, domain_task_id, split_task_id

    ids = [domain_task_id(c, d) for d in range(4) for c in range(1, 41)]
    unseen = [domain_task_id(c, 1 + c % 3) for c in (3, 5, 7)]
    full = make_split(ids, unseen, 4, seed=0)
    few = make_split(ids, unseen, 4, seed=0, shifted_domain_tasks=5)
    per_domain = pd.Series([split_task_id(t)[1] for t in few.train]).value_counts()
    assert per_domain[0] == sum(split_task_id(t)[1] == 0 for t in full.train)  # the plain domain keeps all
    assert all(per_domain[d] == 5 for d in (1, 2, 3))
    assert few.val == full.val and few.unseen == full.unseen and set(few.train) < set(full.train)
    assert set(few.excluded) == set(full.train) - set(few.train)
    assert make_split(ids, unseen, 4, seed=0, shifted_domain_tasks=5) == few  # seeded
    six = make_split(ids, unseen, 4, seed=0, shifted_domain_tasks=6)
    assert set(few.train) != set(six.train)
    # a label-free domain (k = 0): none of its tasks trains or validates; its unseen pairs stay; nothing else moves
    free = make_split(ids, unseen, 4, seed=0, shifted_domain_tasks=5, label_free_domains=[2])
    assert not any(split_task_id(t)[1] == 2 for t in free.train + free.val)
    assert free.unseen == few.unseen and set(free.val) == {t for t in few.val if split_task_id(t)[1] != 2}
    assert set(free.train) == {t for t in few.train if split_task_id(t)[1] != 2}
    assert set(free.train) | set(free.val) | set(free.unseen) | set(free.excluded) == set(ids)
    with pytest.raises(TaskError):
        make_split(ids, unseen, 4, seed=0, label_free_domains=[0])  # the plain images cannot be label-free


# ----------------------------------------------------------------------------------------------------------------
# Canonical hidden-unit order
# ----------------------------------------------------------------------------------------------------------------


def _random_head(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"0.weight": torch.randn(D, D, generator=gen), "0.bias": torch.randn(D, generator=gen),
            "2.weight": torch.randn(2, D, generator=gen)}


def _logits(sd, x):
    return head_logits({k: v[None] for k, v in sd.items()}, x)[0]


def test_permuted_head_is_the_same_function():
    x, _ = _features(50)
    sd = _random_head(0)
    perm = torch.randperm(D, generator=torch.Generator().manual_seed(1))
    moved = permute_hidden(sd, perm)
    assert not torch.equal(moved["0.weight"], sd["0.weight"])
    torch.testing.assert_close(_logits(moved, x), _logits(sd, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["sort", "match"])
def test_gauge_undoes_any_permutation(method):
    """Two hidden-unit orders of the same heads land on the same canonical weights (and the same functions)."""
    x, _ = _features(50)
    heads = [_random_head(s) for s in range(4)]
    gen = torch.Generator().manual_seed(5)
    shuffled = [permute_hidden(sd, torch.randperm(D, generator=gen)) for sd in heads]
    gauge = Gauge.fit(method, heads)
    a, b = gauge(heads), gauge(shuffled)
    for sa, sb, sd in zip(a, b, heads):
        for k in HEAD_KEYS:
            torch.testing.assert_close(sa[k], sb[k])
        torch.testing.assert_close(_logits(sa, x), _logits(sd, x), atol=1e-5, rtol=1e-5)
    assert Gauge("none")(shuffled) == shuffled


def test_match_aligns_noisy_copies_to_the_reference():
    ref = _random_head(0)
    gen = torch.Generator().manual_seed(3)
    perm = torch.randperm(D, generator=gen)
    noisy = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in permute_hidden(ref, perm).items()}
    back = permute_hidden(noisy, match_permutation(noisy, unit_features(ref)))
    torch.testing.assert_close(back["0.weight"], ref["0.weight"], atol=0.1, rtol=0)


def test_gauge_groups_share_one_permutation():
    base = _random_head(0)
    ckpts = [base, {k: v + 1e-3 for k, v in base.items()}]  # one task's two checkpoints
    out = Gauge("sort")(ckpts, group_size=2)
    torch.testing.assert_close(out[1]["0.weight"] - out[0]["0.weight"], torch.full((D, D), 1e-3))


# ----------------------------------------------------------------------------------------------------------------
# Config: regimes and neutral defaults
# ----------------------------------------------------------------------------------------------------------------


def test_new_keys_at_their_neutral_default_leave_rule_settings_unchanged():
    cfg = load_config(REPO / "config" / "config.yaml").raw
    zoo = config_setting(cfg, "seed", "zoo")
    assert '"init"' not in zoo
    changed = {**cfg, "zoo": {**cfg["zoo"], "init": "per_task"}}
    assert '"init": "per_task"' in config_setting(changed, "seed", "zoo")
    assert "n_seen" not in config_setting(cfg, "tasks.n_seen", "tasks.n_val")
    raw_order = {**cfg, "train": {**cfg["train"], "canonicalise": "none"}}
    assert "canonicalise" not in config_setting(raw_order, "train")
    assert '"canonicalise": "sort"' in config_setting({**cfg, "train": {**cfg["train"], "canonicalise": "sort"}}, "train")


def test_every_regime_file_resolves(monkeypatch):
    monkeypatch.chdir(REPO)
    base = load_config(REPO / "config" / "config.yaml").raw
    regimes = S.study_regimes(base)
    assert set(regimes) == set(base["study"]["regimes"])
    assert S.zoo_key(base, regimes["shared_init"]) is None  # the workflow's own zoo
    assert S.zoo_key(base, regimes["per_task_init"]) == S.zoo_key(base, regimes["per_task_init_match"])
    assert S.zoo_key(base, regimes["per_task_init"]).startswith("per_task_")
    assert regimes["per_task_init_sort"]["train"]["canonicalise"] == "sort"
    # the workflow sorts units, the regimes name their own order: the raw-order rows stay raw
    assert base["train"]["canonicalise"] == "sort"
    assert {regimes[r]["train"]["canonicalise"] for r in ("shared_init", "per_task_init", "seen64", "domains")} == {"none"}
    assert regimes["seen64"]["tasks"]["n_seen"] == 64 and regimes["holdout_neighbours"]["tasks"]["holdout_neighbours"]
    assert regimes["seen16"]["results_dir"].endswith("study/seen16")
    common = yaml.safe_load((REPO / "config" / "experiments" / "regimes" / "common.yaml").read_text())
    assert regimes["seen16"]["train"]["steps"] == common["train"]["steps"]  # the study's budget (common.yaml)
    few, variant = regimes["domains_few"], regimes["domains_few_cond1024"]  # a one-change variant via `base:`
    assert variant["rpg"]["condition_hidden"] == 1024 and variant["domains"] == few["domains"]
    assert variant["tasks"] == few["tasks"] and variant["train"] == few["train"]


def test_regimes_name_each_job_its_config(monkeypatch):
    """The main rules' wildcards name a job's regime: `regime`, or the first regime with that zoo, domain features or
    tables folder; no wildcard of these is the default profile, the regime named by `experiment`."""
    monkeypatch.chdir(REPO)
    base = load_config(REPO / "config" / "config.yaml").raw
    regimes = S.Regimes(base)
    assert regimes.names[0] == base["experiment"] and regimes.config(base["experiment"]) == base
    assert regimes.zoo("shared_init") == base["experiment"]  # the workflow's own zoo
    assert regimes.owner({"zoo": regimes.zoo("per_task_init_match")}) == "per_task_init"  # its first user builds it
    assert regimes.owner({"domains": regimes.domains("domains_few")}) == "domains"
    assert regimes.domains("seen16") is None
    assert regimes.owner({"results_dir": regimes.results_dir("seen64")}) == "seen64"
    assert regimes.owner({"results_dir": base["results_dir"]}) == regimes.owner({}) == base["experiment"]
    assert regimes.job_config({"regime": "seen16"}) == S.regime_config(base, "seen16")
    with pytest.raises(ValueError, match="zoo"):
        regimes.owner({"zoo": "per_task_00000000"})


def test_regime_file_starts_from_its_base(tmp_path):
    """`base: <regime>` starts a regime file from another's overrides (recursively; the file's own keys win), and a
    cycle of bases is refused by name."""
    (tmp_path / "a.yaml").write_text("tasks: {n_seen: 64}\ntrain: {steps: 10, lr: 0.5}\n")
    (tmp_path / "b.yaml").write_text("base: a\ntrain: {steps: 20}\n")
    (tmp_path / "c.yaml").write_text("base: b\nrpg: {d_model: 8}\n")
    assert S.regime_overrides(tmp_path, "c") == {"tasks": {"n_seen": 64}, "train": {"steps": 20, "lr": 0.5},
                                                 "rpg": {"d_model": 8}}
    (tmp_path / "a.yaml").write_text("base: c\n")
    with pytest.raises(ValueError, match="c -> b -> a -> c"):
        S.regime_overrides(tmp_path, "c")


def test_regime_may_not_change_the_shared_backbone(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    base = load_config(REPO / "config" / "config.yaml").raw
    (tmp_path / "bad.yaml").write_text("backbone: {epochs: 1}\n")
    base = {**base, "study": {**base["study"], "regime_dir": str(tmp_path), "regimes": ["bad"]}}
    with pytest.raises(ValueError, match="backbone"):
        S.regime_config(base, "bad")


# ----------------------------------------------------------------------------------------------------------------
# Gathering unseen_study.csv
# ----------------------------------------------------------------------------------------------------------------


def _samples(offset: float) -> pd.DataFrame:
    """samples.csv rows for 2 unseen and 2 seen tasks: originals, 2 RPG samples and every baseline."""
    rows = []
    for group, tasks in (("unseen", [314, 482]), ("seen", [3, 5])):
        for i, t in enumerate(tasks):
            acc = {"original": [0.90, 0.92], "rpg": [0.80 + offset, 0.70 + offset]}
            acc.update({name: [0.60 + 0.01 * j] for j, name in enumerate(BASELINES)})
            for kind, values in acc.items():
                for k, a in enumerate(values):
                    rows.append({"group": group, "kind": kind, "task_id": t, "embedding": format(t, "010b"),
                                 "index": k, "accuracy": a + 0.01 * i, "balanced_accuracy": a - 0.1,
                                 "l2_novelty": 1.0 if kind != "rpg" else 2.0, "max_iou_original": 0.5,
                                 "pairwise_iou": 0.4})
    return pd.DataFrame(rows)


def _regime_files(folder: Path, samples: pd.DataFrame, summary: str = '{"n_train_tasks": 7, "steps": 40}') -> dict:
    folder.mkdir(exist_ok=True)
    samples.to_csv(folder / "samples.csv", index=False)
    (folder / "s.json").write_text(summary)
    return {"samples": [folder / "samples.csv"], "rpg_summary": folder / "s.json"}


def _gathered(tmp_path):
    """Two regimes' samples, gathered; returns the frame and the CSV path."""
    paths = {name: _regime_files(tmp_path / name, _samples(offset), '{"n_train_tasks": 7, "steps": 40, '
                                 '"best_step": 20, "best_score": 0.5, "val_original_accuracy": 0.9}')
             for name, offset in (("a", 0.0), ("b", 0.1))}
    return S.write_study(paths, None, tmp_path / "study.csv"), tmp_path / "study.csv"


def test_gather_study_summarises_every_method(tmp_path):
    out, _ = _gathered(tmp_path)
    assert set(out.regime) == {"a", "b"} and set(out.group) == {"unseen", "seen"}
    assert list(out[(out.regime == "a") & (out.group == "unseen")].method) == ["original", "rpg", *BASELINES]

    def get(regime, method, col="accuracy_mean", group="unseen"):
        row = out[(out.regime == regime) & (out.group == group) & (out.method == method)]
        assert len(row) == 1
        return float(row[col].iloc[0])

    assert get("a", "original") == pytest.approx(91.5)  # mean over tasks (90.5, 92.5) of the originals' mean
    assert get("a", "original", "accuracy_best") == pytest.approx(92.5)  # the best original of each task
    assert get("a", "rpg", "accuracy_best") == pytest.approx(80.5) and get("a", "rpg") == pytest.approx(75.5)
    assert [get("a", m, "n_heads") for m in ("original", "rpg", "affine")] == [2, 2, 1]
    assert get("b", "rpg", "accuracy_best") == pytest.approx(90.5)
    assert get("a", "rpg", "minus_original_best") == pytest.approx(-11.0)
    assert get("a", "rpg", "minus_original_mean") == pytest.approx(-16.0)
    assert get("a", "compose") == pytest.approx(100 * (0.60 + 0.01 * BASELINES.index("compose") + 0.005))
    assert get("a", "compose", "accuracy_best") == get("a", "compose")  # one head per task
    assert get("a", "rpg", "balanced_accuracy_best") == pytest.approx(70.0)  # no per-task offset
    assert get("a", "rpg", "l2_novelty") == 2.0 and get("a", "original", "l2_novelty") == 1.0
    best = 100 * (0.60 + 0.01 * (len(BASELINES) - 1) + 0.005)
    assert get("a", "rpg", "rpg_best_minus_baseline_acc") == pytest.approx(80.5 - best)
    assert get("a", "rpg", "best_minus_baseline") == pytest.approx(80.5 - best)
    assert get("a", "original", "best_minus_baseline") == pytest.approx(92.5 - best)
    assert set(out[out.group == "unseen"].best_baseline) == {BASELINES[-1]}
    assert get("a", "rpg", "accuracy_best", group="seen") == pytest.approx(80.5)
    assert get("a", "rpg", "val_score") == 50.0
    assert pd.read_csv(tmp_path / "study.csv").shape == out.shape


def test_gather_study_takes_study_methods_from_their_own_files(tmp_path):
    """A study method's samples (rule study_method) join its regime's rows after the built-ins."""
    paths = {"a": _regime_files(tmp_path / "a", _samples(0.0))}
    mine = _samples(0.0)
    mine = mine[mine.kind == "rpg"].assign(kind="mine", accuracy=lambda f: f.accuracy + 0.05)
    mine.to_csv(tmp_path / "mine.csv", index=False)
    paths["a"]["samples"].append(tmp_path / "mine.csv")
    out = S.gather_study(paths)
    unseen = out[out.group == "unseen"].set_index("method")
    assert list(unseen.index) == ["original", "rpg", *BASELINES, "mine"]
    assert unseen.loc["mine", "accuracy_best"] == pytest.approx(unseen.loc["rpg", "accuracy_best"] + 5)
    assert unseen.loc["mine", "best_baseline"] == BASELINES[-1]  # the yardstick stays the built-in baselines


def test_best_baseline_is_one_present_on_every_task(tmp_path):
    """A baseline that exists on some tasks only (the complement swap where the complement trains) is reported but is
    not the yardstick: its mean is over other tasks than RPG's."""
    samples = _samples(0.0)
    partial = (samples.kind == "complement") & (samples.task_id == 482)
    samples = samples[~partial].copy()
    samples.loc[samples.kind == "complement", "accuracy"] = 0.99
    out = S.gather_study({"a": _regime_files(tmp_path / "a", samples)})
    unseen = out[out.group == "unseen"]
    assert int(unseen.loc[unseen.method == "complement", "n_tasks"].iloc[0]) == 1
    assert set(unseen.best_baseline) == {BASELINES[-1]}  # not the complement, though its mean is higher


def test_committed_reference_has_the_gathered_layout(tmp_path):
    """docs/reference/unseen_study/unseen_study.csv has the columns gather_study writes, in its order."""
    out, _ = _gathered(tmp_path)
    reference = pd.read_csv(REPO / "docs" / "reference" / "unseen_study" / "unseen_study.csv")
    settings = ["zoo_init", "canonicalise", "holdout_neighbours", "shifted_domain_tasks", "domains",
                "label_free_domains"]
    assert [c for c in reference.columns if c not in settings] == list(out.columns)


def test_gather_study_reports_the_label_free_domain_apart(tmp_path):
    """With tasks.label_free_domains the unseen pairs of that domain get their own group; there the per-domain
    baselines do not exist, so the yardstick is a baseline that does (compose)."""
    from rpg.config import validate_config
    from rpg.experiments.task_zoo.tasks import domain_task_id

    plain, free = domain_task_id(314, 2), domain_task_id(482, 1)
    samples = _samples(0.0)
    samples.loc[samples.task_id == 314, "task_id"] = plain
    samples.loc[samples.task_id == 482, "task_id"] = free
    per_domain = samples.kind.isin([b for b in BASELINES if b != "compose"]) & (samples.task_id == free)
    samples = samples[~per_domain].copy()
    cfg = validate_config({**load_config(REPO / "config" / "config.yaml").raw,
                           "domains": {"names": ["identity", "rot90", "invert"]},
                           "tasks": {"label_free_domains": ["rot90"]}})
    out = S.gather_study({"a": _regime_files(tmp_path / "a", samples)}, {"a": cfg})
    lf = out[out.group == "unseen_label_free"].set_index("method")
    assert set(lf.n_tasks) == {1} and "affine" not in lf.index and set(lf.best_baseline) == {"compose"}
    assert lf.loc["rpg", "accuracy_best"] == pytest.approx(100 * (0.80 + 0.01))  # the second task's RPG best
    assert set(out.label_free_domains) == {"rot90"}
    assert int(out[(out.group == "unseen") & (out.method == "rpg")].n_tasks.iloc[0]) == 2


def _kernel_available() -> bool:
    from jupyter_client.kernelspec import KernelSpecManager

    return "rpg" in KernelSpecManager().find_kernel_specs()


def test_unseen_study_notebook_committed_clean_and_executes(tmp_path):
    import nbformat

    nb = nbformat.read(REPO / "notebooks" / "unseen_study.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []) and "require_inputs" in code[1].source
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    if not _kernel_available():
        pytest.skip("Jupyter kernel 'rpg' not installed (make install)")
    from rpg.experiments.notebooks import execute_notebook

    _, study_csv = _gathered(tmp_path)
    execute_notebook(REPO / "notebooks" / "unseen_study.ipynb", tmp_path / "nb.ipynb",
                     {"study_csv": str(study_csv), "out_dir": str(tmp_path / "figures")})
    png = tmp_path / "figures" / "unseen_study.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert list(pd.read_csv(tmp_path / "figures" / "unseen_study.csv").regime) == ["a", "b"]


# ----------------------------------------------------------------------------------------------------------------
# The DAG
# ----------------------------------------------------------------------------------------------------------------


def test_unseen_study_dry_run(tmp_path, snakemake_cli):
    """`snakemake -n unseen_study` plans every regime's stages, one zoo per distinct zoo setting, and the notebook."""
    proc = snakemake_cli("-n", "--cores", "2", "unseen_study", "--config", f"results_dir={tmp_path / 'results'}",
                         f"data={{root: {tmp_path}, download: true}}", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    n = len(load_config(REPO / "config" / "config.yaml").study.regimes)
    # the regimes run through the main rules (their `regime` wildcard): table16 and seen_summary per regime
    assert counts["train_rpg"] == n and counts["generate"] == n and counts["tables"] == 2 * n
    # every per_task regime shares one zoo, both domains regimes another; shared_init regimes use the workflow's
    assert counts["zoo"] == 1 + 2 and counts["domain_features"] == 1
    assert counts["notebook_unseen_study"] == 1
    assert "table11.csv" not in proc.stdout  # the study is its own target, not part of table11


# ----------------------------------------------------------------------------------------------------------------
# A per-task, canonicalised regime end to end (tiny): zoo -> split -> RPG -> generate -> tables
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sort", "match"])
def test_canonicalised_per_task_regime_runs_end_to_end(tmp_path, repo_root, method):
    from rpg.experiments.task_zoo import pipeline
    from rpg.experiments.task_zoo.features import load_features
    from rpg.experiments.task_zoo.tables import write_tables
    from rpg.utils import save_safetensors_atomic

    x, y = _features(300)
    feats = {"train_x": x, "train_y": y, "val_x": x[:100].clone(), "val_y": y[:100].clone(), "test_x": x[100:].clone(),
             "test_y": y[100:].clone()}
    save_safetensors_atomic(feats, tmp_path / "features.safetensors", {"feature_dim": D})
    seen, unseen = [3, 5, 12, 33, 100, 255, 256, 300, 709, 744], [279, 314]
    cfg = load_config([repo_root / "config" / "config.yaml", repo_root / "config" / "test.yaml"], overrides={
        "results_dir": str(tmp_path / "results"),
        "tasks": {"ids": seen + unseen, "unseen": unseen, "table11": ["0100010111"], "n_val": 2, "n_seen_eval": 2,
                  "n_seen": 6},
        "zoo": {"init": "per_task", "steps": 20, "batch_size": 32, "save_every": 2, "task_chunk": 4},
        "train": {"steps": 4, "eval_every": 4, "save_every": 4, "batch_size": 4, "diffusion_batch": 16,
                  "canonicalise": method},
        "generate": {"samples": 2, "seen_samples": 1},
        "logging": {"wandb": False, "progress": False},
    })
    inputs = {"features": str(tmp_path / "features.safetensors"), "index": str(tmp_path / "zoo" / "index.csv"),
              "split": str(tmp_path / "split.json"), "rpg": str(tmp_path / "rpg" / "best.safetensors"),
              "samples": str(tmp_path / "gen" / "samples.csv")}
    zoo_dir = tmp_path / "zoo"
    # what the rules' scripts call (workflow/scripts/zoo.py, split.py, train_rpg.py, generate.py, tables.py)
    pipeline.build_zoo(cfg, inputs["features"], zoo_dir)
    split = pipeline.write_split(cfg, inputs["split"])
    assert len(split.train) == 6
    pipeline.train_conditional_rpg(cfg, zoo_dir, inputs["split"], inputs["features"], tmp_path / "rpg")
    pipeline.generate_and_evaluate(cfg, inputs["rpg"], inputs["split"], inputs["features"], zoo_dir, tmp_path / "gen")
    tables = write_tables(cfg, inputs["samples"], {"table16": str(tmp_path / "t16.csv")}, names=["table16"])
    assert (tmp_path / "t16.csv").is_file() and len(tables["table16"]) == len(unseen) + 1
    samples = pd.read_csv(inputs["samples"])
    # originals of training tasks are their own nearest checkpoint in the canonical gauge too: the zoo's spread is
    # measured between *other* checkpoints, so it is > 0 and finite
    orig = samples[(samples.kind == "original") & (samples.group == "seen")]
    assert (orig.l2_novelty > 0).all() and orig.l2_novelty.notna().all()
    assert load_features(inputs["features"])["test_x"].shape[0] == 200


# ----------------------------------------------------------------------------------------------------------------
# A method of one's own, from outside the package (study.methods), through the study DAG
# ----------------------------------------------------------------------------------------------------------------

TOY_METHOD = '''
import torch

from rpg.experiments.task_zoo.methods import TaskGenerator


class NearestTrainingHead(TaskGenerator):
    """The mean head of the training task whose code is closest (the first on a tie)."""

    name = "nearest_training_head"

    def __init__(self, ctx):
        self.ctx = ctx

    def fit(self, zoo, codes):
        self.heads, self.codes = zoo.mean_heads, codes

    def generate(self, query):
        return self.heads[torch.cdist(query.codes, self.codes).argmin(1)][:, None]
'''


def test_study_method_from_outside_the_package_joins_the_study_table(tmp_path, snakemake_cli, workflow_dag,
                                                                   monkeypatch):
    """`study.methods: ["toy_methods:NearestTrainingHead"]` (a module written here) runs through rule study_method
    on a tiny regime, and its rows are in unseen_study.csv: on seen tasks it is the task's own mean head, so it
    scores exactly as the built-in `nearest` (scored by generate), which it can only do through the same split,
    evaluator and tasks. The backbone, features and zoo are the session DAG's (copied)."""
    (tmp_path / "toy_methods.py").write_text(TOY_METHOD)
    (tmp_path / "regimes").mkdir()
    (tmp_path / "regimes" / "tiny.yaml").write_text("{}\n")  # the test profile as it is
    (tmp_path / "regimes" / "common.yaml").write_text("{}\n")  # no study budget over it
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    results = tmp_path / "results"
    config = dag_upstream_copy(workflow_dag, tmp_path)
    proc = snakemake_cli(
        "--cores", "2", str(results / "unseen_study.csv"), *config,
        f"study={{regimes: [tiny], regime_dir: {tmp_path / 'regimes'}, common: {tmp_path / 'regimes' / 'common.yaml'}, "
        "methods: ['toy_methods:NearestTrainingHead']}", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = pd.read_csv(results / "unseen_study.csv")
    mine = table[table.method == "nearest_training_head"].set_index("group")
    assert set(mine.index) == {"unseen", "seen"} and set(mine.regime) == {"tiny"}
    assert list(table[table.group == "unseen"].method)[-1] == "nearest_training_head"  # after the built-ins
    for group in ("unseen", "seen"):
        original = table[(table.group == group) & (table.method == "original")].iloc[0]
        assert mine.loc[group, "n_tasks"] == original.n_tasks and mine.loc[group, "n_heads"] == 1
        assert 0 < mine.loc[group, "accuracy_mean"] <= 100 and mine.loc[group, "l2_novelty"] >= 0
    nearest = table[(table.group == "seen") & (table.method == "nearest")].iloc[0]
    assert mine.loc["seen", "accuracy_mean"] == nearest.accuracy_mean
    assert mine.loc["seen", "balanced_accuracy_mean"] == nearest.balanced_accuracy_mean
    assert (results / "methods" / "tiny" / "toy_methods.NearestTrainingHead" / "samples.csv").is_file()
    assert not copied_stages_that_ran(tmp_path)


def test_variants_are_grouped_by_task_setting_and_chosen_on_seen_validation():
    """Regimes that agree on the zoo, the split and the domains are one setting; the variant reported is the one
    with the best seen-task validation score, not the best unseen test accuracy (the first listed on a tie)."""
    setting = {"zoo_init": "shared", "n_train_tasks": 279, "holdout_neighbours": False,
               "shifted_domain_tasks": 8.0, "domains": "identity,blur", "label_free_domains": float("nan")}
    rows = [("few", 70.0, 75.0), ("few_big", 74.0, 71.0), ("few_tie", 74.0, 90.0),  # one setting, three variants
            ("plain", 93.0, 93.0)]                                                    # another (no domains)
    frame = pd.DataFrame([{**setting, "regime": name, "val_score": val, "accuracy_best": test,
                           **({"domains": "", "shifted_domain_tasks": float("nan"), "n_train_tasks": 992}
                              if name == "plain" else {})} for name, val, test in rows])
    frame = pd.concat([frame, frame.assign(group="seen")], ignore_index=True)  # several rows per regime
    chosen = S.variants_chosen_on_validation(frame)
    assert chosen.to_dict("records") == [{"setting": "few", "regime": "few_big", "variants": 3},
                                         {"setting": "plain", "regime": "plain", "variants": 1}]
    with pytest.raises(ValueError, match="val_score"):
        S.variants_chosen_on_validation(frame.drop(columns="val_score"))
