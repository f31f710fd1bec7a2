"""Shared settings and helpers for the test suite.

Tests run on CPU with one thread, W&B disabled, and only small synthetic data made by the tests themselves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TQDM_DISABLE", "1")

from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

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


class SnakemakeRunner:
    """`snakemake` command lines, run from the repository root, through one tests/_snakemake_server.py process.

    Each call is the real command line (`snakemake.cli.main`) in a fresh fork of a process that has already imported
    what the Snakefile imports, so it costs ~1 s instead of ~10 s of start-up; see tests/_snakemake_server.py.
    """

    def __init__(self) -> None:
        # -P: like the `snakemake` executable, nothing of tests/ on sys.path
        self._server = subprocess.Popen([sys.executable, "-P", str(REPO_ROOT / "tests" / "_snakemake_server.py")],
                                        cwd=REPO_ROOT, env=self._env(), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    @staticmethod
    def _env() -> dict[str, str]:
        """This process's environment, W&B off, this Python's bin folder first (where `snakemake` is installed)."""
        return {**os.environ, "WANDB_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def __call__(self, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        """`snakemake *args`; returncode -14 means it ran past `timeout` seconds."""
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            out.touch()
            err.touch()
            request = {"args": list(args), "cwd": str(REPO_ROOT), "env": self._env(), "stdout": str(out),
                       "stderr": str(err), "timeout": timeout}
            self._server.stdin.write(json.dumps(request) + "\n")
            self._server.stdin.flush()
            reply = self._server.stdout.readline()
            if not reply:
                raise RuntimeError(f"tests/_snakemake_server.py ended (exit status {self._server.wait()})")
            return subprocess.CompletedProcess(["snakemake", *args], json.loads(reply)["returncode"],
                                               out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        self._server.stdin.close()
        self._server.wait(timeout=60)


@pytest.fixture(scope="session")
def snakemake_cli() -> Iterator[SnakemakeRunner]:
    """Runs `snakemake` command lines (skips the test where Snakemake is not installed)."""
    if importlib.util.find_spec("snakemake") is None:
        pytest.skip("snakemake is not installed")
    runner = SnakemakeRunner()
    yield runner
    runner.close()


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
