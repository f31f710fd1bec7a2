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

from rpg.checkpoint import save_rpg  # noqa: E402
from rpg.config import DiffusionConfig, ModelConfig  # noqa: E402
from rpg.experiments.task_zoo.heads import initial_head  # noqa: E402
from rpg.model import RPG  # noqa: E402
from rpg.tokenize import Tokenizer  # noqa: E402

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


def save_tiny_head_generator(path: Path, sample_steps: int) -> tuple[RPG, Tokenizer]:
    """An untrained task-conditioned generator of 8-wide binary heads (3 initial heads fit the tokenizer), saved to
    `path`; returns the model and tokenizer (e.g. to save a corrupted copy)."""
    tok = Tokenizer.fit([initial_head(8, seed) for seed in range(3)], 16)
    model = RPG(tiny_model_config(condition="task"), tok.layer_index, tok.token_index)
    save_rpg(path, model, tok, DiffusionConfig(sample_steps=sample_steps), step=0)
    return model, tok
