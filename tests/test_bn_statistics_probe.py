"""probes/bn_statistics_probe.py: swapping BatchNorm statistics touches only running means / variances, and the
per-layer errors are in the units the docstring promises (checked on a hand-made BatchNorm state dict)."""

from __future__ import annotations

import importlib.util
import math

import torch
from conftest import REPO_ROOT


def _load_probe():
    spec = importlib.util.spec_from_file_location("bn_statistics_probe",
                                                  REPO_ROOT / "probes" / "bn_statistics_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bn_state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["0.weight"] = torch.randn(sd["0.weight"].shape, generator=gen)
    sd["1.running_mean"] = torch.randn(8, generator=gen)
    sd["1.running_var"] = torch.rand(8, generator=gen) + 0.5
    return sd


def test_with_statistics_swaps_only_running_statistics():
    probe = _load_probe()
    weights, stats = _bn_state(0), _bn_state(1)
    mixed = probe.with_statistics(weights, stats)
    for key, value in mixed.items():
        source = stats if key.endswith(("running_mean", "running_var")) else weights
        assert torch.equal(value, source[key]), key


def test_layer_errors_are_in_standard_deviations_and_log_std_ratios():
    probe = _load_probe()
    checkpoint = _bn_state(0)
    generated = dict(checkpoint)
    sd = (checkpoint["1.running_var"].double() + probe.EPS).sqrt()
    generated["1.running_mean"] = (checkpoint["1.running_mean"].double() + 0.5 * sd).float()  # half a sd off
    generated["1.running_var"] = 4 * (checkpoint["1.running_var"] + probe.EPS) - probe.EPS  # twice the sd
    (row,) = probe.layer_errors(generated, checkpoint, {"1.running_mean": 0.3, "1.weight": 0.1})
    assert row["layer"] == "1" and row["channels"] == 8
    assert math.isclose(row["mean_shift_rms_sd"], 0.5, rel_tol=1e-5)
    assert math.isclose(row["log_std_ratio_rms"], math.log(2), rel_tol=1e-5)
    assert row["token_rms_running_mean"] == 0.3 and row["token_rms_weight"] == 0.1
    assert math.isnan(row["token_rms_running_var"])
    (same,) = probe.layer_errors(checkpoint, checkpoint, {})
    assert same["mean_shift_rms_sd"] == 0 and same["log_std_ratio_rms"] == 0
