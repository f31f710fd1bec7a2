"""rpg.allocator: with `keep_freed_memory()` freed activations are reused instead of faulted in again, and
every workflow job applies it as its config says (rpg.experiments.rules.run_rule)."""

from __future__ import annotations

import platform
import subprocess
import sys
import types

import pytest
from conftest import REPO_ROOT

import rpg.experiments.rules as rules
from rpg.allocator import keep_freed_memory
from rpg.config import load_config

CONFIGS = [REPO_ROOT / "config" / "config.yaml", REPO_ROOT / "config" / "test.yaml"]
# A fresh process (malloc's settings are per process): training steps of a one-conv net whose activations
# (256 x 16 x 64 x 64 float32: 64 MiB each) are larger than glibc's largest mmap threshold (32 MiB), as the
# backbone's are; print the minor page faults of two steps after two.
_TRAIN_STEPS = """
import resource, sys, torch
from rpg.allocator import keep_freed_memory
if sys.argv[1] == "keep_freed":
    assert keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU())
x = torch.randn(256, 3, 64, 64)
def step():
    net.zero_grad(set_to_none=True)
    net(x).square().mean().backward()
step()
step()  # the heap has grown to what a step needs (mmap off: it may still grow in the second)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
ACTIVATION_PAGES = 64 * 2**20 // 4096


def _faults(setting: str) -> int:
    out = subprocess.run([sys.executable, "-c", _TRAIN_STEPS, setting], capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT, timeout=120)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_reuses_freed_activations():
    system, kept = _faults("system"), _faults("keep_freed")
    assert system >= 3 * ACTIVATION_PAGES, f"expected the default malloc to fault new blocks in: {system} faults"
    assert kept < system // 5, f"keep_freed_memory: {kept} faults against {system} without"


@pytest.mark.parametrize("enabled", [True, False])
def test_run_rule_applies_the_configs_allocator_setting(tmp_path, monkeypatch, enabled):
    calls = []
    monkeypatch.setattr(rules, "keep_freed_memory", lambda enabled=True: calls.append(enabled) or enabled)
    cfg = load_config(CONFIGS, overrides={"results_dir": str(tmp_path), "keep_freed_memory": enabled})
    smk = types.SimpleNamespace(threads=1, log=[str(tmp_path / "job.log")], config=cfg.raw)
    assert rules.run_rule(smk, lambda c: c.keep_freed_memory) is enabled
    assert calls == [enabled]


def test_keep_freed_memory_disabled_changes_nothing():
    assert keep_freed_memory(False) is False  # `keep_freed_memory: false` in the config: glibc's defaults stay
