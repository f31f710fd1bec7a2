"""The test DAG on a real SLURM cluster through config/profiles/slurm (snakemake-executor-plugin-slurm).

Where no cluster answers, the test starts a one-node one with scripts/start_slurm.sh when it is root (as CI does,
.ci/run starts it first) and skips, naming the reason, when it is not. It runs the chain to the paper tables (backbone,
features, zoo, split, train_rpg, generate, tables) on synthetic CIFAR-10 with `--workflow-profile
config/profiles/slurm` plus only what the one-node test cluster needs (its partition, no account, squeue for job
states, memory it has), and checks that every job was a SLURM job that completed and that the tables equal the
local run's (conftest.WorkflowRun) to the last digit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO_ROOT, workflow_config_args
from rpg.data import write_synthetic_cifar10

pytestmark = pytest.mark.slow

TABLES = ("table11", "table16", "table12", "seen_summary")
JOBCOMP = Path(os.environ.get("RPG_SLURM_JOBCOMP", "/var/log/slurm/jobcomp.log"))


def _cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, check=False)
    return proc.returncode == 0 and bool(re.search(r"^(idle|mixed|allocated)", proc.stdout, re.M))


@pytest.fixture(scope="module")
def slurm_partition() -> str:
    """The default partition of a responding cluster, started by scripts/start_slurm.sh where needed (root)."""
    if not _cluster_answers():
        if os.geteuid() != 0:
            pytest.skip("no SLURM cluster answers (sinfo) and not root: run `sudo bash scripts/start_slurm.sh`")
        proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "start_slurm.sh")], capture_output=True,
                              text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout.split()
    return next((p.rstrip("*") for p in out if p.endswith("*")), out[0])


def _job_states(job_ids: list[str]) -> dict[str, str]:
    """Final state of each job: the jobcomp/filetxt record (scripts/start_slurm.sh), else `scontrol show job`."""
    states: dict[str, str] = {}
    if JOBCOMP.is_file():
        for line in JOBCOMP.read_text().splitlines():
            m = re.match(r"JobId=(\d+) .*?JobState=(\S+)", line)
            if m:
                states[m[1]] = m[2]
    for job in job_ids:
        if job not in states:
            proc = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                                  check=False)
            m = re.search(r"JobState=(\S+)", proc.stdout)
            states[job] = m[1] if m else "unknown"
    return {job: states[job] for job in job_ids}


def test_test_dag_on_slurm_equals_the_local_run(slurm_partition, snakemake_cli, workflow_dag, tmp_path):
    write_synthetic_cifar10(tmp_path / "data", n_train=600, n_test=200)  # as conftest.WorkflowRun does
    targets = [str(tmp_path / "results" / f"{t}.csv") for t in TABLES]
    start = time.perf_counter()
    proc = snakemake_cli(
        "--workflow-profile", "config/profiles/slurm", *workflow_config_args(tmp_path),
        # what the one-node test cluster needs: its partition, no accounting (so no account and no sacct), its memory
        "--default-resources", f"slurm_partition={slurm_partition}", "runtime=30",
        "--set-resources", "train_rpg:mem_mb=2000", "--slurm-no-account", "--slurm-status-command", "squeue",
        # and, for a test, job states polled every 2 s instead of 40 s (a chain of 7 jobs: ~4 min less)
        "--slurm-init-seconds-before-status-checks", "2",
        "--slurm-logdir", str(tmp_path / "slurm_logs"), "--slurm-keep-successful-logs", "--retries", "0",
        *targets, timeout=900)
    wall = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]

    # Every job of the run was submitted to SLURM and completed there.
    stats = re.search(r"Job stats:\n(.*?)\n\n", out, re.S)
    assert stats, out[-3000:]
    planned = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats[1], re.M) if m[1] != "total"}
    assert {"backbone", "features", "zoo", "split", "train_rpg", "generate", "tables"} <= set(planned), planned
    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+?)\)", out)
    assert len(submitted) == sum(planned.values()), out[-3000:]
    per_rule: dict[str, int] = {}
    for _, log in submitted:
        rule = re.search(r"rule_(\w+)", log)[1]
        per_rule[rule] = per_rule.get(rule, 0) + 1
    assert per_rule == planned
    states = _job_states([job for job, _ in submitted])
    assert set(states.values()) == {"COMPLETED"}, states
    print(f"SLURM run: {len(submitted)} jobs in {wall:.1f} s")  # the per-job overhead (pytest -s)

    # The tables equal those of the local run of the same DAG.
    local = workflow_dag.result()
    assert local.returncode == 0, local.stdout[-5000:]
    for table in TABLES:
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "results" / f"{table}.csv"),
                                      pd.read_csv(workflow_dag.tmp / "results" / f"{table}.csv"), check_exact=True,
                                      obj=table)
