"""Shared settings and helpers for the test suite.

Tests run on CPU with one thread, W&B disabled, and only small synthetic data made by the tests themselves.
"""

from __future__ import annotations

import os

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TQDM_DISABLE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from rpg.config import ModelConfig  # noqa: E402

torch.set_num_threads(1)  # the test machines have 2 cores, often shared: 1 thread is fastest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def tiny_model_config(**overrides) -> ModelConfig:
    """A generator small enough for CPU unit tests (Mamba d_model 32, 2 heads of 16, denoiser 1-8-16-8-1)."""
    values = dict(token_size=16, recurrent="mamba", d_model=32, n_layers=2, d_state=16, d_conv=4, expand=2,
                  headdim=16, denoiser_channels=(1, 8, 16, 8, 1), kernel_size=7, position="2d",
                  permutation_state=False, condition="none", condition_dim=10)
    values.update(overrides)
    return ModelConfig(**values)
