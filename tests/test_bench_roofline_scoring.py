"""benchmarks/bench_roofline.py, bench_scoring.py and bench_ablation_job.py run end to end at tiny sizes (the test
profile), the roofline's bound column follows from its measured columns, and batched scoring gives the
one-at-a-time path's logits and predictions. ~30 s on the 2-core machines."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT

from rpg.cli.doc_views import ROOFLINE_TARGET, VIEWS, Reference, roofline_bound

TEST_PROFILE = ["--config", str(REPO_ROOT / "config" / "config.yaml"), str(REPO_ROOT / "config" / "test.yaml")]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_roofline_smoke_and_view(tmp_path):
    out = tmp_path / "roofline" / "roofline.csv"
    _load("bench_roofline").main([*TEST_PROFILE, "--threads", "1", "--backbone-steps", "1", "--images", "64",
                                  "--zoo-tasks", "4", "--zoo-steps", "2", "--rpg-steps", "1", "--samples", "1",
                                  "--table1", "cnn_s", "--peak-sizes", "256", "--out", str(out)])
    df = pd.read_csv(out)
    stages = df[df.flops.notna()]
    assert list(stages.stage) == ["backbone training", "feature extraction", "zoo (head training)", "RPG training",
                                  "generation", "test-set scoring cnn_s"]
    assert (stages.flops > 0).all() and (stages.bytes > 0).all() and (stages.seconds > 0).all()
    assert ((stages.fraction_of_peak - stages.achieved_flop_s / stages.peak_flop_s).abs() < 1e-9).all()
    assert "device_name" in df.columns and (out.parent / "lscpu.txt").exists()
    # the scoring stage's FLOPs are the model's: 2 x multiply-adds of the convolutions and the linear layer
    cnn_s = [(3, 8, 32), (8, 12, 16), (12, 16, 8)]  # (c_in, c_out, resolution) of rpg_cnn_s's 3x3 convolutions
    macs = sum(ci * co * 9 * r * r for ci, co, r in cnn_s) + 16 * 10
    assert stages.flops.iloc[-1] == 2 * macs * 64
    table = VIEWS["roofline"](Reference(tmp_path))
    assert table.count("\n| ") == len(stages) + 1 and "Measured peaks: matmul fp32" in table


def _row(**values) -> pd.Series:
    base = dict(fraction_of_peak=0.1, intensity_flop_per_byte=50.0, machine_balance=10.0, overhead_fraction=0.0,
                ops=1000, peak_flop_s=1e11, bandwidth_bytes_s=1e10, achieved_flop_s=1e10)
    return pd.Series({**base, **values})


def test_roofline_bound_follows_from_the_measured_columns():
    assert roofline_bound(_row(fraction_of_peak=ROOFLINE_TARGET)) == ""
    assert roofline_bound(_row(intensity_flop_per_byte=3.9)).startswith("memory-bound: 3.9 FLOP/B")
    assert roofline_bound(_row(overhead_fraction=0.5)).startswith("Python overhead: 1,000 small ops")
    assert roofline_bound(_row()) == "kernels at 10.0 % of the roofline"  # 1e10 of min(1e11, 50 x 1e10)


@pytest.mark.parametrize("arch,kwargs", [("rpg_cnn_s", {}),
                                         ("rpg_cifar_cnn", {"widths": (8, 8), "stem_width": 4, "feature_dim": 8})])
def test_batched_scoring_equals_one_at_a_time(arch, kwargs):
    bench = _load("bench_scoring")
    from rpg.vision.architectures import build_model
    from rpg.vision.preprocess import Preprocess

    template = build_model(arch, kwargs).eval()
    sds = bench.random_state_dicts(template, 3, seed=0)
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    prepare = Preprocess(channels_last=True)
    one = bench.one_at_a_time_logits(template, sds, images, prepare, batch_size=16)
    batched = bench.batched_logits(template, sds, images, prepare, batch_size=16)
    assert batched.shape == one.shape == (3, 50, 10)
    torch.testing.assert_close(batched, one, rtol=1e-5, atol=1e-5)
    assert torch.equal(batched.argmax(-1), one.argmax(-1))


def test_ablation_job_smoke(tmp_path):
    """bench_ablation_job.py times every part of an ablation job and its scoring candidates keep the predictions."""
    out = tmp_path / "ablation_job.csv"
    _load("bench_ablation_job").main([*TEST_PROFILE, "--variant", "mamba-2d-perm-runs1-tok64", "--steps", "2",
                                      "--repeats", "1", "--images", "120", "--peak-sizes", "256", "--out", str(out)])
    df = pd.read_csv(out)
    assert {"train", "generate", "both"} == set(df.job)
    assert (df.seconds > 0).all() and (df.job_seconds == df.seconds * df.per_job).all()
    step = df[df.part == "RPG training step"].iloc[0]
    assert step.per_job == 6 and step.flops > 0  # the test profile's architectures.ablations.train.steps
    candidates = df[df.part.str.contains("prepared")]
    assert len(candidates) == 2 and candidates.same_predictions.all()


def test_generator_amp_smoke(tmp_path):
    """bench_generator_amp.py times a row's training step and sampling in both precisions; ratios and the tokens'
    relative distance follow from its own columns."""
    out = tmp_path / "generator_amp.csv"
    _load("bench_generator_amp").main([*TEST_PROFILE, "--rows", "cnn_s", "--steps", "2", "--repeats", "1",
                                       "--out", str(out)])
    df = pd.read_csv(out)
    assert set(zip(df.part, df.precision)) == {(p, q) for p in ("train", "sample") for q in ("fp32", "bf16")}
    assert (df.seconds > 0).all()
    for part, rows in df.groupby("part"):
        fp32 = rows[rows.precision == "fp32"].seconds.iloc[0]
        assert (rows.ratio - fp32 / rows.seconds).abs().max() < 1e-9
    sample = df[df.part == "sample"]
    assert (sample.token_rel_diff > 0).all() and (sample.token_rel_diff < 0.5).all()
    assert df[df.part == "train"].mean_loss.notna().all()
