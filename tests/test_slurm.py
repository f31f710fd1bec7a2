"""The test DAG on a real SLURM cluster through config/profiles/slurm (snakemake-executor-plugin-slurm).

conftest.SlurmRun runs, from the session's start, the chain to the paper tables (backbone, features, zoo, split,
train_rpg, generate, tables) on synthetic CIFAR-10 with `--workflow-profile config/profiles/slurm` plus only what
a one-node test cluster needs (its partition, no account, squeue for job states, memory it has, 2 s between
polls). Where no cluster answers it is started by scripts/start_slurm.sh as root (CI: .ci/run starts it first);
not root, the test skips and says why. Checked: every job of the run was a SLURM job that completed, and the tables
equal the local run's (conftest.WorkflowRun) to the last digit.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import SlurmRun

pytestmark = pytest.mark.slow

JOBCOMP = Path(os.environ.get("RPG_SLURM_JOBCOMP", "/var/log/slurm/jobcomp.log"))


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


def test_test_dag_on_slurm_equals_the_local_run(slurm_dag, workflow_dag):
    proc = slurm_dag.result(timeout=900)
    out = proc.stdout
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

    # The tables equal those of the local run of the same DAG.
    local = workflow_dag.result()
    assert local.returncode == 0, local.stdout[-5000:]
    for table in SlurmRun.TABLES:
        pd.testing.assert_frame_equal(pd.read_csv(slurm_dag.tmp / "results" / f"{table}.csv"),
                                      pd.read_csv(workflow_dag.tmp / "results" / f"{table}.csv"), check_exact=True,
                                      obj=table)
