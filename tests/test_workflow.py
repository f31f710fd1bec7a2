"""End to end: the whole Snakemake DAG on synthetic CIFAR-10 (config/test.yaml), lint, the paper profile's DAG,
and determinism (same config and seed -> same zoo and same tables).

The DAG runs once per session from the repository root, writing only under pytest's tmp folder; it starts with the
session (conftest.WorkflowRun), beside the tests before this module. Every other `snakemake` command line goes through
conftest's `snakemake_cli` (the real command line, without paying the Snakefile's imports for each of them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO_ROOT, copied_stages_that_ran, dag_upstream_copy, snakemake_env, workflow_config_args
from rpg.config import load_config
from rpg.data import write_synthetic_cifar10
from rpg.experiments.task_zoo.tasks import embedding_to_id
from rpg.utils import load_safetensors

pytestmark = pytest.mark.slow

RULES_WITH_LOG = ("backbone", "features", "zoo", "split", "train_rpg", "generate")
RULES_WITH_BENCHMARK = ("backbone", "features", "zoo", "train_rpg", "generate")
TABLES = ("table11", "table16", "table12", "seen_summary")
TASK_TABLE_COLUMNS = [
    "embedding", "task_id", "positive_classes",
    "original_acc", "rpg_best_acc", "rpg_mean_acc", "rpg_min_acc", "rpg_std_acc",
    "original_bal_acc", "rpg_best_bal_acc", "rpg_mean_bal_acc", "rpg_min_bal_acc", "rpg_std_bal_acc",
    "gap_best", "gap_mean", "n_samples",
    "original_best_acc", "original_best_bal_acc",
    *[f"{b}_{m}" for b in ("affine", "nearest", "complement", "mean", "noise", "compose") for m in ("acc", "bal_acc")],
    "best_baseline_acc", "rpg_best_minus_baseline_acc", "best_baseline_bal_acc", "rpg_best_minus_baseline_bal_acc",
    "best_baseline",
    *[f"{kind}_{name}" for kind in ("rpg", "original") for name in ("l2_novelty", "max_iou_original", "pairwise_iou")],
]
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def workflow_run(workflow_dag):
    """The test DAG's results (conftest.WorkflowRun: it started with the session)."""
    proc = workflow_dag.result()
    assert proc.returncode == 0, proc.stdout[-10000:]
    tmp = workflow_dag.tmp
    cfg = load_config([REPO_ROOT / "config" / "config.yaml", REPO_ROOT / "config" / "test.yaml"],
                      overrides={"results_dir": str(tmp / "results"), "data": {"root": str(tmp / "data")}})
    return {"tmp": tmp, "results": tmp / "results", "cfg": cfg, "log": proc.stdout}


# First the tests that do not need the DAG's results: they run while it finishes (it started with the session).


def test_snakemake_lint(snakemake_cli):
    """`snakemake --lint` exits 0 (default config and test config)."""
    for extra in ([], ["--configfile", "config/test.yaml"]):
        proc = snakemake_cli("--lint", *extra, timeout=300)
        assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]


@pytest.mark.skipif(not (REPO_ROOT / "config" / "paper.yaml").exists(), reason="config/paper.yaml does not exist")
def test_paper_profile_dry_run(tmp_path, snakemake_cli):
    """`snakemake -n --configfile config/paper.yaml` builds the paper DAG (one fine-tuning job per task)."""
    write_synthetic_cifar10(tmp_path / "data", n_train=50, n_test=20)
    proc = snakemake_cli("-n", "--cores", "2", "--configfile", "config/paper.yaml", "--config",
                         f"results_dir={tmp_path / 'results'}", f"data={{root: {tmp_path / 'data'}}}", timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "finetune_task" in out and "train_rpg" in out and "tables" in out


def _weights_and_step(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    tensors, meta = load_safetensors(path)
    return tensors, meta["step"]


def test_tables_exist_with_expected_columns(workflow_run):
    res, cfg = workflow_run["results"], workflow_run["cfg"]
    frames = {name: pd.read_csv(res / f"{name}.csv", dtype={"embedding": str}) for name in TABLES}
    for name in ("table11", "table16", "seen_summary"):
        assert list(frames[name].columns) == TASK_TABLE_COLUMNS, name
        numeric = frames[name][[c for c in TASK_TABLE_COLUMNS if c.endswith("_acc") and "minus" not in c]]
        assert ((numeric.fillna(0) >= 0) & (numeric.fillna(0) <= 100)).all().all(), name
        assert frames[name][["affine_acc", "nearest_acc", "compose_acc", "rpg_l2_novelty"]].notna().all().all()
        assert frames[name].embedding.iloc[-1] == "mean"
        expected = cfg.generate.seen_samples if name == "seen_summary" else cfg.generate.samples
        assert (frames[name].n_samples == expected).all(), name
    t11 = frames["table11"]
    assert len(t11) == 10 + 1
    assert t11.embedding.tolist()[:10] == list(cfg.tasks.table11)  # the paper's order
    assert [int(t) for t in t11.task_id.iloc[:10]] == [embedding_to_id(e) for e in cfg.tasks.table11]
    t16 = frames["table16"]
    assert len(t16) == len(cfg.tasks.unseen) + 1
    assert sorted(int(t) for t in t16.task_id.iloc[:-1]) == sorted(cfg.tasks.unseen)
    assert len(frames["seen_summary"]) == cfg.tasks.n_seen_eval + 1
    seen_ids = {int(t) for t in frames["seen_summary"].task_id.iloc[:-1]}
    assert not seen_ids & set(cfg.tasks.unseen)
    t12 = frames["table12"]
    assert list(t12.columns) == ["embedding", "task_id", "model", "n_models", "accuracy", "balanced_accuracy",
                                 *CLASS_NAMES]
    assert t12.embedding.drop_duplicates().tolist() == list(cfg.tasks.flip_pair)
    assert t12.model.tolist()[:2] == ["original", "rpg"]
    for emb in cfg.tasks.flip_pair:  # originals, RPG, then the baselines that exist for the task
        models = t12[t12.embedding == emb].model.tolist()
        assert models[:2] == ["original", "rpg"] and {"affine", "nearest", "mean", "noise", "compose"} <= set(models)


def test_table1_family(workflow_run):
    """table1.csv has one row per configured architecture; each ablation family one row per setting; generated
    models are saved ready to rebuild from their metadata."""
    from rpg.checkpoint import load_rpg
    from rpg.experiments.arch_study import study as ax
    from rpg.vision.architectures import load_model_file

    res, cfg = workflow_run["results"], workflow_run["cfg"]
    arch = cfg.architectures
    t1 = pd.read_csv(res / "table1.csv")
    assert t1.architecture.tolist() == list(arch.table1)
    assert (t1.n_samples == arch.samples).all() and (t1.n_original == arch.collect.n_checkpoints).all()
    for col in ("original_best_acc", "original_mean_acc", "original_min_acc", "rpg_best_acc", "rpg_mean_acc",
                "rpg_min_acc"):
        assert t1[col].between(0, 100).all(), col
    assert (t1.original_best_acc >= t1.original_mean_acc).all() and (t1.rpg_mean_acc >= t1.rpg_min_acc).all()
    assert (res / "table1.config.yaml").is_file()
    # whole models sample with the architectures.sample_steps candidate that scores best on validation images;
    # a row with its own settings (vit_nano: x0-prediction, one step count) uses them, the others the family's
    assert cfg.diffusion.sample_steps not in arch.sample_steps and t1.sample_steps.isin(arch.sample_steps).all()
    for row in t1.itertuples():
        spec = ax.arch_spec(cfg, row.architecture)
        generator = res / "table1" / "main" / "rpg" / row.architecture / row.variant / "best.safetensors"
        assert load_rpg(generator)[2].prediction == spec.diffusion.prediction
        if isinstance(spec.sample_steps, int):
            assert row.sample_steps == spec.sample_steps and pd.isna(row.sample_steps_val)
            continue
        val = {int(k): float(v) for k, v in (item.split(":") for item in row.sample_steps_val.split())}
        assert sorted(val) == sorted(spec.sample_steps)
        assert row.sample_steps == min(val, key=lambda k: (-val[k], spec.sample_steps.index(k)))
    assert {ax.arch_spec(cfg, name).diffusion.prediction for name in arch.table1} == {"eps", "x0"}
    ab = arch.ablations
    expected = {"recurrent": len(ab.recurrent), "position": len(ab.position),
                "permutation": 2 * len(ab.permutation_runs), "token_size": len(ab.token_size)}
    for family, rows in expected.items():
        table = pd.read_csv(res / "ablations" / f"{family}.csv")
        assert len(table) == rows and (table.family == family).all(), family
        assert {"train_seconds", "train_peak_rss_mb"} <= set(table.columns)
    model_file = next((res / "table1" / "main" / "generated" / "vit_nano").rglob("models/00.safetensors"))
    model = load_model_file(model_file)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_arch_sample_steps_benchmark_reproduces_table1(workflow_run, tmp_path):
    """probes/arch_sample_steps.py, at the step count the table chose, gives exactly table1.csv's generated
    accuracies (same generators, same noise): what it reports beside other step counts is what the table measures."""
    import subprocess
    import sys

    import yaml

    res, arch = workflow_run["results"], workflow_run["cfg"].architectures
    local = tmp_path / "local.yaml"
    local.write_text(yaml.safe_dump({"results_dir": str(res), "data": {"root": str(workflow_run["tmp"] / "data")}}))
    out = tmp_path / "steps.csv"
    proc = subprocess.run(
        [sys.executable, "probes/arch_sample_steps.py", "--config", "config/config.yaml",
         "config/test.yaml", str(local), "--results", str(res), "--steps", "1", *map(str, arch.sample_steps),
         "--threads", "1", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = pd.read_csv(out)
    t1 = pd.read_csv(res / "table1.csv").set_index("architecture")
    assert sorted(steps.architecture.unique()) == sorted(t1.index)
    assert set(steps.sample_steps) == {1, *arch.sample_steps}
    same = steps.merge(t1.sample_steps.reset_index(), on=["architecture", "sample_steps"]).set_index("architecture")
    assert len(same) == len(t1)
    for col in ("rpg_best_acc", "rpg_mean_acc", "original_mean_acc", "rpg_l2_spread", "original_l2_spread"):
        assert (same[col] - t1.loc[same.index, col]).abs().max() < 0.01, col


def test_generator_probe_compares_predictions_on_accuracy_and_spread(workflow_run, tmp_path):
    """probes/generator_probe.py trains one generator per arm on a Table 1 collection (here eps and v) and
    reports validation accuracy beside the samples' spread and novelty; the collection's own distances are the
    same for every arm and equal rpg.weightspace's. An arm with an EMA also reports the averaged weights (another
    row of the same run: same losses, other samples)."""
    import subprocess
    import sys

    import yaml

    from rpg.utils import load_safetensors
    from rpg.weightspace import flatten, mean_distance, nearest_distance

    res = workflow_run["results"]
    local = tmp_path / "local.yaml"
    local.write_text(yaml.safe_dump({"results_dir": str(res), "data": {"root": str(workflow_run["tmp"] / "data")}}))
    collection = res / "table1" / "collections" / "cnn_s" / "run0"
    out = tmp_path / "probe.csv"
    proc = subprocess.run(
        [sys.executable, "probes/generator_probe.py", "--config", "config/config.yaml", "config/test.yaml",
         str(local), "--arch", "cnn_s", "--collection", str(collection), "--steps", "3", "--samples", "2",
         "--threads", "1", "--arm", "eps:diffusion.prediction=eps", "--arm", "v:diffusion.prediction=v;train.ema=0.5",
         "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = pd.read_csv(out)
    assert rows.arm.tolist() == ["eps", "v", "v (EMA 0.5)"]
    v, ema = rows.iloc[1], rows.iloc[2]
    assert v.loss_tail == ema.loss_tail and v.rpg_l2_novelty != ema.rpg_l2_novelty
    points = flatten([load_safetensors(f)[0] for f in sorted(collection.glob("[0-9][0-9].safetensors"))])
    spread = float(mean_distance(points, points, exclude_self=True).mean())
    nn = float(nearest_distance(points, points, exclude_self=True).mean())
    assert (rows.collection_l2_spread - spread).abs().max() < 1e-4
    assert (rows.collection_l2_novelty - nn).abs().max() < 1e-4
    assert (rows.rpg_l2_spread > 0).all() and (rows.rpg_l2_novelty > 0).all()
    assert rows.val_accuracy_mean.between(0, 1).all()


def test_config_beside_every_table(workflow_run):
    res = workflow_run["results"]
    for name in TABLES:
        path = res / f"{name}.config.yaml"
        assert path.is_file(), path
        saved = load_config(path)  # the saved config is complete and valid on its own
        assert saved.results_dir == str(res) and saved.experiment == "test"
        # --config data={root: ...} was merged into config/test.yaml's data section, not put in its place
        assert saved.data.root == str(workflow_run["tmp"] / "data") and saved.data.val_images == 100


def test_every_rule_has_log_and_benchmark(workflow_run):
    res, exp = workflow_run["results"], workflow_run["cfg"].experiment
    for rule in RULES_WITH_LOG:
        assert (res / "logs" / exp / f"{rule}.log").is_file(), rule
    for name in TABLES:  # the tables rule: one job per table, its log under <results_dir>/logs/tables/
        assert (res / "logs" / "tables" / f"{name}.log").is_file(), name
    for rule in RULES_WITH_BENCHMARK:
        bench = res / "benchmarks" / "rules" / exp / f"{rule}.tsv"
        assert bench.is_file(), rule
        assert pd.read_csv(bench, sep="\t").shape[0] >= 1


def test_no_half_written_files(workflow_run):
    leftovers = [p for p in workflow_run["results"].rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def test_rerun_gives_identical_zoo_and_tables(workflow_run, snakemake_cli):
    """Determinism of the DAG: forcing the zoo (and so everything after it) to run again gives identical zoo
    checkpoints (torch.equal) and identical table CSVs (byte for byte)."""
    res, exp = workflow_run["results"], workflow_run["cfg"].experiment
    ckpt_dir = res / "zoo" / exp / "checkpoints"
    before = {p.name: load_safetensors(p)[0] for p in sorted(ckpt_dir.glob("*.safetensors"))}
    tables = {name: (res / f"{name}.csv").read_bytes() for name in TABLES}
    assert len(before) == len(workflow_run["cfg"].tasks.ids) * workflow_run["cfg"].zoo.n_checkpoints
    # only the tables as targets: the analyses downstream of the zoo are not what this test is about
    targets = [str(res / f"{name}.csv") for name in TABLES]
    proc = snakemake_cli("--cores", "2", *targets, "--forcerun", "zoo", *workflow_config_args(workflow_run["tmp"]))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    after = {p.name: load_safetensors(p)[0] for p in sorted(ckpt_dir.glob("*.safetensors"))}
    assert set(after) == set(before)
    for name, tensors in before.items():
        assert all(torch.equal(tensors[k], after[name][k]) for k in tensors), name
    for name, data in tables.items():
        assert (res / f"{name}.csv").read_bytes() == data, f"{name}.csv changed on a rerun"


def test_killed_train_rpg_job_resumes_on_rerun(tmp_path, snakemake_cli, workflow_dag):
    """A `train_rpg` job killed mid-training (SIGKILL to snakemake's process group, as a crashed machine) resumes on
    `snakemake --unlock` + `--rerun-incomplete`, although Snakemake deletes the job's best.safetensors first: the
    log names the step it resumed from, and the final best and last weights equal those of an uninterrupted run (the
    same job rerun by `--forcerun train_rpg`: a finished run whose best.safetensors is gone trains from scratch).
    The stages before it are the session DAG's (copied)."""
    rpg_dir = tmp_path / "results" / "rpg" / "test"
    state, log = rpg_dir / "last.opt.pt", tmp_path / "results" / "logs" / "test" / "train_rpg.log"
    steps = 150  # ~5 s of training here: the kill lands after the first save (step 10), long before the last
    target = str(rpg_dir / "best.safetensors")
    config = [*dag_upstream_copy(workflow_dag, tmp_path), f"train={{steps: {steps}}}"]
    args = [target, *config]

    def logged_by(*snakemake_args: str) -> str:
        """Run snakemake; what the train_rpg job logged meanwhile."""
        before = log.read_text() if log.exists() else ""
        proc = snakemake_cli(*snakemake_args, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        after = log.read_text()
        return after[len(before):] if after.startswith(before) else after

    with (tmp_path / "killed.out").open("w") as out:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "snakemake", "--cores", "1", *args], cwd=REPO_ROOT,
                                env=snakemake_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert state.exists(), (tmp_path / "killed.out").read_text()[-3000:]
    saved = torch.load(state, weights_only=True)
    killed_at, best_at = int(saved["step"]), int(saved["best_step"])
    assert 0 < best_at <= killed_at < steps and (rpg_dir / "best.safetensors").exists()

    assert snakemake_cli("--unlock", *args, timeout=300).returncode == 0
    resumed = logged_by("--cores", "1", "--rerun-incomplete", *args)
    assert f"restored {rpg_dir / 'best.safetensors'} (step {best_at})" in resumed, resumed  # Snakemake had deleted it
    assert f"resumed from {state} at step {killed_at}" in resumed, resumed
    assert "training from scratch" not in resumed, resumed
    result = {name: _weights_and_step(rpg_dir / name) for name in ("best.safetensors", "last.safetensors")}
    resumed_log = pd.read_csv(rpg_dir / "train_log.csv")

    uninterrupted = logged_by("--cores", "1", target, "--forcerun", "train_rpg", *config)  # it takes many names
    assert "training from scratch" in uninterrupted and "resumed from" not in uninterrupted, uninterrupted
    for name, (tensors, step) in result.items():
        reference, reference_step = _weights_and_step(rpg_dir / name)
        assert step == reference_step and reference.keys() == tensors.keys(), name
        assert all(torch.equal(tensors[k], reference[k]) for k in tensors), f"{name} differs after resuming"
    full_log = pd.read_csv(rpg_dir / "train_log.csv")
    assert resumed_log[["step", "loss", "val/score"]].equals(full_log[["step", "loss", "val/score"]])
    assert not copied_stages_that_ran(tmp_path, "split")  # the split is in the copied zoo folder


def test_zoo_training_deterministic_on_workflow_features(workflow_run):
    """rpg.experiments.task_zoo.heads.train_heads twice with the same seed on the workflow's cached features -> identical tensors."""
    from rpg.experiments.task_zoo.heads import train_heads

    res, cfg = workflow_run["results"], workflow_run["cfg"]
    feats, _ = load_safetensors(res / "features" / cfg.experiment / "features.safetensors")
    kw = dict(steps=10, batch_size=32, lr=1e-3, weight_decay=0.0, n_checkpoints=2, save_every=2, seed=cfg.seed,
              progress=False)
    a = train_heads(feats["train_x"], feats["train_y"], list(cfg.tasks.ids), **kw)
    b = train_heads(feats["train_x"], feats["train_y"], list(cfg.tasks.ids), **kw)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _scheduled_rules(dry_run_output: str) -> set[str]:
    """Rule names in the 'Job stats' table of a dry run."""
    rules, in_stats = set(), False
    for line in dry_run_output.splitlines():
        if line.startswith("Job stats"):
            in_stats = True
        elif in_stats and line.strip().startswith(("job", "---")):
            continue
        elif in_stats and line.strip():
            name = line.split()[0]
            if name == "total":
                break
            rules.add(name)
    return rules


def _rules_with_params_changed(dry_run_output: str) -> set[str]:
    """Rules under "params have changed since last execution" in the 'Reasons' section of a dry run (Snakemake 9:
    one line of comma-separated rule names under each reason)."""
    lines = dry_run_output.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.strip() == "params have changed since last execution:":
            return set(lines[i + 1].strip().split(", "))
    return set()


def _summary_rules(summary_output: str, column: str, value: str) -> set[str]:
    """Rules of the outputs whose `column` ("status" or "plan") is `value` in `snakemake --summary`'s table (output,
    date, rule, log, status, plan)."""
    index = {"status": 4, "plan": 5}[column]
    rows = [line.split("\t") for line in summary_output.splitlines()[1:]]
    return {row[2] for row in rows if len(row) >= 6 and row[index] == value}


def test_config_change_reruns_what_it_affects(workflow_run, snakemake_cli):
    """A changed zoo setting (given as the README's nested --config override) reruns the zoo and everything
    downstream of it, nothing upstream. What the README says shows the jobs a change reruns names them and no
    other: `--summary` marks the outputs of each rule whose own setting changed `params changed` (zoo, train_rpg)
    and what it would remake `update pending`; a dry run's reasons name the rules the change reaches first (zoo;
    train_rpg is downstream of it). (Snakemake 9.27.1's `--list-changes params` names an output of every job,
    changed or not.) Both override forms parse."""
    tmp = workflow_run["tmp"]
    change = ["zoo={lr: 0.0005}", "train={steps: 7}"]
    proc = snakemake_cli("-n", "--cores", "2", *workflow_config_args(tmp), *change)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    scheduled = _scheduled_rules(proc.stdout)
    assert {"zoo", "split", "train_rpg", "generate", "tables"} <= scheduled, scheduled
    assert not scheduled & {"backbone", "features", "collect_checkpoints", "train_arch_rpg"}, scheduled
    assert _rules_with_params_changed(out) == {"zoo"}, out[-3000:]
    tables = [str(workflow_run["results"] / f"{name}.csv") for name in TABLES]
    summary = snakemake_cli("--summary", *tables, *workflow_config_args(tmp), *change)
    assert summary.returncode == 0, summary.stdout[-3000:] + summary.stderr[-3000:]
    assert _summary_rules(summary.stdout, "status", "params changed") == {"zoo", "train_rpg"}, summary.stdout[-3000:]
    assert _summary_rules(summary.stdout, "plan", "update pending") == {"zoo", "split", "train_rpg", "generate",
                                                                         "tables"}, summary.stdout[-3000:]
    reasons = snakemake_cli("-n", *tables, *workflow_config_args(tmp), "zoo={lr: 0.0005}", "--quiet", "rules")
    assert _rules_with_params_changed(reasons.stdout + reasons.stderr) == {"zoo"}, reasons.stdout[-3000:]
    # the same config as the run: the tables are up to date (other tests may have rerun part of the DAG)
    unchanged = snakemake_cli("-n", "--cores", "2", *tables, *workflow_config_args(tmp))
    assert "Nothing to be done" in unchanged.stdout + unchanged.stderr, unchanged.stdout[-3000:]
    summary = snakemake_cli("--summary", *tables, *workflow_config_args(tmp))
    assert summary.returncode == 0 and not _summary_rules(summary.stdout, "status", "params changed") \
        and not _summary_rules(summary.stdout, "plan", "update pending"), summary.stdout[-3000:]


@pytest.fixture(scope="module")
def report_html(workflow_run, snakemake_cli):
    """`snakemake --report` of the test DAG: one HTML file."""
    report = workflow_run["tmp"] / "report.html"
    proc = snakemake_cli("--report", str(report), *workflow_config_args(workflow_run["tmp"]))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return report


def test_report_has_tables_and_figures(report_html):
    """`snakemake --report` writes one HTML file with the tables, figures and per-rule runtimes."""
    html = report_html.read_text(errors="replace")
    assert "table11.csv" in html and "table1.csv" in html and "pca_heads.png" in html


REPORT_FIGURES = {"pca_heads.png": "notebook_pca_heads", "similarity_iou.png": "notebook_similarity_iou",
                  "finetune_curves.png": "notebook_finetune_curves"}
REPORT_TABLES = {**{f"{t}.csv": "tables" for t in TABLES}, "table13.csv": "table13", "table1.csv": "table1"}


def test_report_in_chromium_shows_tables_and_figures_with_captions(report_html):
    """The report opened in headless Chromium (tests/_report_browser.py): each category's menu item, each result's
    eye button (figures: the image loads in the page; tables: their download link holds the file) and information
    button (its caption, naming the rule that wrote it), read from the rendered page."""
    import _report_browser

    if _report_browser.find_chromium() is None:
        if os.geteuid() == 0:  # CI: .ci/run installs it
            pytest.fail("no Chromium: apt-get install chromium (as .ci/run does)")
        pytest.skip("no Chromium to open the report in (apt-get install chromium)")
    walk = _report_browser.walk(report_html)
    seen = {Path(r["label"]).name: r for r in walk}
    assert {r["category"] for r in walk} >= {"Task zoo (paper §5)", "Figures",
                                              "Architecture study (Table 1, ablations)"}, walk
    for name, rule in {**REPORT_FIGURES, **REPORT_TABLES}.items():
        assert name in seen, (name, sorted(seen))
        caption = seen[name]["caption"]
        assert seen[name]["info"] and f"rule {rule}" in caption, seen[name]
        assert not any(other in caption for other in seen), seen[name]  # its own, not the rule's other outputs
    for name in REPORT_FIGURES:
        width, height = seen[name]["image"]
        assert width >= 200 and height >= 150, seen[name]
    for name in REPORT_TABLES:
        assert seen[name]["download_bytes"] == (report_html.parent / "results" / name).stat().st_size, seen[name]


# ---------------------------------------------------------------------------------------------------------------
# train_rpg of the test DAG through the pipeline's entry point under torchrun (DDP, gloo), on the DAG's zoo
# ---------------------------------------------------------------------------------------------------------------

TORCHRUN = Path(sys.executable).with_name("torchrun")
TIMING_KEYS = {"seconds"}  # wall time of the training loop


def run_pipeline_train(results: Path, base: Path) -> dict[str, Path]:
    """`python -m rpg.experiments.task_zoo.pipeline train` on the test DAG's zoo, split and features (`results`):
    one process ("one"); `torchrun --standalone --nproc_per_node 2` ("two"); two single-process "nodes" on the
    loopback address (`--nnodes 2 --node_rank 0|1 --master_addr 127.0.0.1`, "nodes"). W&B offline; each run's
    results_dir is BASE/<run>/results; under torchrun, tests/_ddp_worker.py's audit records what rank 1 writes."""
    zoo = results / "zoo" / "test"
    inputs = ["--zoo", str(zoo), "--split", str(zoo / "split.json"),
              "--features", str(results / "features" / "test" / "features.safetensors")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    worker = str(REPO_ROOT / "tests" / "_ddp_worker.py")

    def pipeline_args(name: str) -> list[str]:
        run = base / name
        run.mkdir(parents=True)
        (run / "run.yaml").write_text(yaml.safe_dump({"results_dir": str(run / "results"),
                                                      "logging": {"wandb": True, "wandb_mode": "offline"}}))
        return ["train", "--config", "config/config.yaml", "config/test.yaml", str(run / "run.yaml"), *inputs,
                "--out", str(run / "results" / "rpg")]

    def audited(name: str) -> list[str]:
        run = base / name
        return [worker, "pipeline", "--runs", str(run / "results"), "--audit", str(run / "audit"), "--",
                *pipeline_args(name)]

    def launch(cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    nodes = audited("nodes")
    procs = [launch([sys.executable, "-m", "rpg.experiments.task_zoo.pipeline", *pipeline_args("one")]),
             launch([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *audited("two")])]
    for proc in procs:  # one after the other: 2 cores
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-5000:]
    procs = [launch([str(TORCHRUN), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                     "--master_addr", "127.0.0.1", "--master_port", port, *nodes]) for rank in (0, 1)]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-5000:]
    return {name: base / name for name in ("one", "two", "nodes")}


@pytest.fixture(scope="module")
def pipeline_ddp_runs(workflow_run, tmp_path_factory):
    if not TORCHRUN.exists():
        pytest.skip(f"{TORCHRUN} not installed")
    return run_pipeline_train(workflow_run["results"], tmp_path_factory.mktemp("pipeline_ddp"))


def _wandb_files(run: Path) -> list[str]:
    """The W&B offline run under a results_dir: its files, the run id replaced by RUN."""
    (offline,) = (run / "results" / "wandb" / "wandb").glob("offline-run-*")
    run_id = offline.name.rsplit("-", 1)[1]
    return sorted(str(p.relative_to(offline)).replace(run_id, "RUN") for p in offline.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", ["two", "nodes"])
def test_pipeline_train_under_torchrun_writes_what_one_process_writes(pipeline_ddp_runs, name):
    """Two processes (one machine, or two "nodes" on 127.0.0.1) write the same files as one process, with the same
    layout, the same summary up to timings and round-off, a generator equal within 1e-4 relative (tests/test_ddp.py's
    measure; this run trains longer than its problem, and the two sums' round-off grows with the steps: 1.05e-5 on
    an AMD EPYC; a wrong reduction differs by ~10 %) and one W&B offline run; rank 1 writes nothing (audit hook)."""
    from test_ddp import _weights, _worst_relative
    tol = 1e-4

    one, ddp = pipeline_ddp_runs["one"] / "results" / "rpg", pipeline_ddp_runs[name] / "results" / "rpg"
    files = sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(ddp)) for p in ddp.rglob("*") if p.is_file()) == files
    assert (ddp / "layout.json").read_text() == (one / "layout.json").read_text()
    s_one, s_ddp = (json.loads((d / "summary.json").read_text()) for d in (one, ddp))
    assert s_ddp.keys() == s_one.keys()
    for key, value in s_one.items():
        if key not in TIMING_KEYS:
            assert s_ddp[key] == (pytest.approx(value, rel=1e-4) if isinstance(value, float) else value), key
    for ckpt in ("best.safetensors", "last.safetensors"):
        worst, tensor = _worst_relative(_weights(ddp / ckpt), _weights(one / ckpt))
        assert worst <= tol, f"{name}: {ckpt} {tensor} differs by {worst:.2e} of its largest weight"
    assert _wandb_files(pipeline_ddp_runs[name]) == _wandb_files(pipeline_ddp_runs["one"])
    assert json.loads((pipeline_ddp_runs[name] / "audit" / "rank1.json").read_text()) == []
