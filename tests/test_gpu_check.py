"""benchmarks/gpu_check.py (the paper profile's one-command GPU check) runs end to end at tiny sizes on CPU
(`--smoke`), so the script cannot rot between the rare sessions that have a GPU. ~15 s on the 2-core machines."""

from __future__ import annotations

import importlib.util

import pandas as pd
from conftest import REPO_ROOT


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_smoke(tmp_path):
    gpu_check = _load_gpu_check()
    results = gpu_check.main(["--smoke", "--out", str(tmp_path), "--threads", "1", "--seq-tokens", "2"])
    for name, (filename, _) in gpu_check.SECTIONS.items():
        frame = pd.read_csv(tmp_path / filename)
        assert len(frame) == len(results[name]) and "device_name" in frame.columns  # machine columns beside numbers
        assert "error" not in set(frame.get("status", [])), frame.get("reason")
    mamba = pd.read_csv(tmp_path / "mamba_parity.csv")
    assert set(mamba.status) == {"skipped"} and mamba.reason.str.contains("no GPU").all()  # a recorded reason
    assert (mamba.torch_fwd_bwd_s > 0).all()
    train = results["train"][0]
    assert train["steps_timed"] >= 1 and train["step_s_median"] > 0 and train["condition_tokens"] == "last_k"
    gen = pd.read_csv(tmp_path / "generation.csv")
    assert len(gen) == 6 and set(gen["mode"]) == {"sequential", "partial", "full"} and (gen.seconds > 0).all()
    assert results["zoo"][0]["max_abs_diff"] < 1e-5  # the same maths on both sides
