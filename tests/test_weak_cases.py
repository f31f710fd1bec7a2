"""Weak cases of the second fault tour (issue 33): a corrupt result names the rule that writes it, a state-dict
mismatch names its keys, a misspelt `model_kwargs` fails when the workflow loads its config, a missing
`--configfile` is Snakemake's own error, `rpg train --checkpoints FILE` says a folder is expected, and the README's
"which jobs would a config change rerun" names exactly those jobs."""

from __future__ import annotations

import os
import types

import pytest
import torch
import yaml

from conftest import REPO_ROOT, one_line_error, workflow_config_args
from rpg.cli.main import main
from rpg.config import ConfigError, load_config
from rpg.data import write_synthetic_cifar10
from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.features import load_features
from rpg.utils import CheckpointError, load_safetensors, save_safetensors_atomic
from rpg.vision.architectures import build_model, count_parameters


CONFIGS = [REPO_ROOT / "config" / "config.yaml", REPO_ROOT / "config" / "test.yaml"]


def _truncated(path, n_bytes: int = 100):
    """A real safetensors file at `path`, cut to its first `n_bytes`."""
    save_safetensors_atomic({"x": torch.zeros(64)}, path, {})
    path.write_bytes(path.read_bytes()[:n_bytes])
    return path


# ---------------------------------------------------------------------------------------------------------------
# A truncated or corrupt result names the file and the rule that writes it
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("relative, mode, rule", [
    ("features/test/features.safetensors", "batched_heads", "features"),
    ("features/domains_0123abcd/features.safetensors", "batched_heads", "domain_features"),
    ("zoo/test/checkpoints/0003_0.safetensors", "batched_heads", "zoo"),
    ("zoo/test/checkpoints/0003_0.safetensors", "finetune", "finetune_task"),
    ("rpg/test/best.safetensors", "batched_heads", "train_rpg"),
    ("table1/collections/cnn_s/run0/ckpt_000.safetensors", "batched_heads", "collect_checkpoints"),
])
def test_a_job_reading_a_corrupt_result_names_the_rule_to_rerun(tmp_path, relative, mode, rule):
    """run_rule (every workflow job) turns a result file that cannot be read into one message: the file, that it is
    truncated or corrupt, and the rule that writes it with the command that reruns it."""
    cfg = load_config(CONFIGS, overrides={"results_dir": str(tmp_path / "results"), "zoo": {"mode": mode}})
    path = _truncated(tmp_path / "results" / relative)
    smk = types.SimpleNamespace(threads=1, log=[str(tmp_path / "job.log")], config=cfg.raw)
    with pytest.raises(CheckpointError) as info:
        run_rule(smk, lambda _: load_safetensors(path))
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    assert f"{path} is truncated or corrupt" in message and f"rule `{rule}` writes it" in message, message
    assert f"--forcerun {rule}`" in message, message
    assert message in (tmp_path / "job.log").read_text()  # the rule's log says it too


def test_a_study_regime_job_names_the_rule_of_the_workflows_file(tmp_path):
    """A regime of the study runs on its own config (results_dir results/study/<regime>) but reads the workflow's
    features: the rule is found under the workflow's results_dir."""
    cfg = load_config(CONFIGS, overrides={"results_dir": str(tmp_path / "results")})
    path = _truncated(tmp_path / "results" / "features" / "test" / "features.safetensors")
    smk = types.SimpleNamespace(threads=1, log=[], config=cfg.raw)
    regime = {**cfg.raw, "results_dir": str(tmp_path / "results" / "study" / "few_shot")}
    with pytest.raises(CheckpointError, match="rule `features` writes it"):
        run_rule(smk, lambda _: load_features(path), config=regime)


def test_a_file_outside_results_keeps_its_own_message(tmp_path):
    cfg = load_config(CONFIGS, overrides={"results_dir": str(tmp_path / "results")})
    path = _truncated(tmp_path / "elsewhere.safetensors")
    smk = types.SimpleNamespace(threads=1, log=[], config=cfg.raw)
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file") as info:
        run_rule(smk, lambda _: load_features(path))
    assert "--forcerun" not in str(info.value)


def test_writer_rules_agree_with_the_workflow(tmp_path, snakemake_cli):
    """WRITERS names, for every output of the test DAG it knows, the rule Snakemake says writes it
    (`snakemake --summary`: output, date, rule, ...; no job runs); and it knows every .safetensors output."""
    from rpg.experiments.rules import WRITERS, writer_rule

    write_synthetic_cifar10(tmp_path / "data", n_train=20, n_test=10)  # the DAG's first input
    proc = snakemake_cli("--summary", *workflow_config_args(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("\t") for line in proc.stdout.splitlines()[1:] if line.count("\t") >= 4]
    assert len(rows) > 20, proc.stdout[-3000:]
    known = {rule for _, rule in WRITERS}
    checked = 0
    for output, _, rule, *_ in rows:
        named = writer_rule(output, tmp_path / "results")
        if named is not None or rule in known:
            assert named == rule, (output, rule, named)
            checked += 1
        if output.endswith(".safetensors") or output.endswith("checkpoints"):
            assert named == rule, (output, rule)
    assert checked >= 10 and {row[2] for row in rows} >= known - {"domain_features"}


@pytest.mark.slow
def test_truncated_features_in_the_workflow_name_the_rule(tmp_path, snakemake_cli):
    """The tour's case on the test DAG: a features file cut after its job finished makes the `zoo` job that reads it
    fail; Snakemake's output names the file and `--forcerun features`, and that command schedules `features` again.
    (Only `zoo` runs: the backbone and the features are placed by hand, older than nothing they depend on.)"""
    data = write_synthetic_cifar10(tmp_path / "data", n_train=50, n_test=20)
    results = tmp_path / "results"
    backbone = results / "backbone" / "test" / "backbone.safetensors"
    save_safetensors_atomic({"x": torch.zeros(1)}, backbone, {})
    features = _truncated(results / "features" / "test" / "features.safetensors")
    for age, path in ((300, data), (200, backbone), (100, features)):
        os.utime(path, (path.stat().st_mtime - age,) * 2)
    index = str(results / "zoo" / "test" / "index.csv")
    proc = snakemake_cli(index, "--cores", "1", *workflow_config_args(tmp_path), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-5000:]
    assert f"{features} is truncated or corrupt" in out and "rule `features` writes it" in out, out[-5000:]
    rerun = snakemake_cli(index, "-n", *workflow_config_args(tmp_path), "--forcerun", "features")
    assert rerun.returncode == 0 and "rule features:" in rerun.stdout and "rule zoo:" in rerun.stdout, \
        rerun.stdout[-3000:] + rerun.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# A state-dict mismatch names its keys
# ---------------------------------------------------------------------------------------------------------------


def test_score_function_state_dict_mismatch_names_the_keys(tmp_path, capsys):
    """A user's score function that loads a state dict (examples/mlp_eval.py) raises torch's message, which lists
    each kind of problem on a line of its own: the one line names the keys, not only "Error(s) in loading"."""
    model = tmp_path / "mlp.safetensors"
    save_safetensors_atomic({"0.weight": torch.zeros(32, 64), "0.bias": torch.zeros(32),
                             "2.weight": torch.zeros(10, 33)}, model, {})
    rc = main(["evaluate", str(model), "--eval", str(REPO_ROOT / "examples" / "mlp_eval.py") + ":test_accuracy"])
    one_line_error(capsys, rc, "missing '2.bias'", "'2.weight' has shape (10, 33), expected (10, 32)")


def test_torch_load_error_summary_counts_what_it_does_not_show():
    from rpg.utils import load_error_mismatch

    module = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(3)])
    given = {f"extra{i}": torch.zeros(1) for i in range(5)} | {"0.weight": torch.zeros(3, 2)}
    with pytest.raises(RuntimeError) as info:
        module.load_state_dict(given)
    summary = load_error_mismatch(str(info.value))
    assert summary is not None and "\n" not in summary
    assert "missing '0.bias', '1.weight', '1.bias' and 2 more" in summary, summary
    assert "unexpected 'extra0', 'extra1', 'extra2' and 2 more" in summary, summary
    assert "'0.weight' has shape (3, 2), expected (2, 2)" in summary, summary
    assert load_error_mismatch("some other error\nwith two lines") is None


# ---------------------------------------------------------------------------------------------------------------
# A misspelt model_kwargs key fails when the workflow loads its config
# ---------------------------------------------------------------------------------------------------------------

TYPO = {"architectures": {"models": {"vit_nano": {"model_kwargs": {"img_sise": 32}}}}}


def test_model_kwargs_typo_is_a_config_error():
    from rpg.experiments.arch_study.study import architecture_sizes

    with pytest.raises(ConfigError) as info:
        architecture_sizes(load_config(CONFIGS, overrides=TYPO))
    message = str(info.value)
    assert message.startswith("config error at architectures.models.vit_nano.model_kwargs:") and "'img_sise'" in message
    sizes = architecture_sizes(load_config(CONFIGS))  # built on the meta device: the same counts as real weights
    assert sizes["cnn_s"] == count_parameters(build_model("rpg_cnn_s")) and set(sizes) >= {"cnn_s", "vit_nano"}


def test_model_kwargs_typo_stops_the_workflow_before_any_job(tmp_path, snakemake_cli):
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(TYPO))
    args = workflow_config_args(tmp_path)
    proc = snakemake_cli("-n", "--configfile", "config/test.yaml", str(typo), *args[2:])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config error at architectures.models.vit_nano.model_kwargs" in out and "img_sise" in out, out[-3000:]
    assert "InputFunctionException" not in out and "Building DAG of jobs" not in out, out[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# snakemake --configfile missing.yaml: Snakemake's own error
# ---------------------------------------------------------------------------------------------------------------


def test_missing_configfile_is_snakemakes_own_error(tmp_path, snakemake_cli):
    """Snakemake reads --configfile before it reads the Snakefile, so the project cannot catch it: the last line of
    Snakemake's traceback names the file (docs/what_happens_when.md says so; this pins it)."""
    missing = tmp_path / "missing.yaml"
    proc = snakemake_cli("-n", "--configfile", str(missing))
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode != 0
    assert lines[-1] == f"FileNotFoundError: [Errno 2] No such file or directory: '{missing}'", lines[-5:]
    assert not any("Building DAG" in line or "common.smk" in line for line in lines)


# ---------------------------------------------------------------------------------------------------------------
# rpg train / inspect --checkpoints FILE
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["train", "--out", "OUT", "--checkpoints"], ["inspect"]])
def test_checkpoints_given_a_file_says_a_folder_is_expected(tmp_path, capsys, command):
    file = tmp_path / "model.safetensors"
    save_safetensors_atomic({"w": torch.zeros(2)}, file, {})
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in command] + [str(file)]
    err = one_line_error(capsys, main(argv), f"{file} is a file; give the folder that holds the checkpoints")
    assert "not found" not in err
