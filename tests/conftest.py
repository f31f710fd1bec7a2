"""Shared settings and helpers for the test suite.

Tests run on CPU with one thread, W&B disabled, and only small synthetic data made by the tests themselves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
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
from rpg.data import write_synthetic_cifar10  # noqa: E402
from rpg.experiments.task_zoo.heads import initial_head  # noqa: E402
from rpg.model import RPG  # noqa: E402
from rpg.tokenize import Tokenizer  # noqa: E402
from rpg.utils import save_safetensors_atomic  # noqa: E402

torch.set_num_threads(1)  # the test machines have 2 cores, often shared: 1 thread is fastest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


# ----------------------------------------------------------------------------------------------------------------
# Snakemake: the test DAG and command lines
# ----------------------------------------------------------------------------------------------------------------


def snakemake_env() -> dict[str, str]:
    """This process's environment, W&B off, this Python's bin folder first (where `snakemake` is installed)."""
    return {**os.environ, "WANDB_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def workflow_config_args(tmp: Path, data: Path | None = None) -> list[str]:
    """The test DAG's config: config/test.yaml, with results under `tmp` and the synthetic CIFAR-10 in `data`
    (default: under `tmp`)."""
    # Snakemake merges --config into the config files recursively, so data: {root: ...} keeps the other data keys.
    return ["--configfile", "config/test.yaml", "--config", f"results_dir={tmp / 'results'}",
            f"data={{root: {data or tmp / 'data'}}}"]


class SnakemakeRunner:
    """`snakemake` command lines, run from the repository root, through one tests/_snakemake_server.py process.

    Each call is the real command line (`snakemake.cli.main`) in a fresh fork of a process that has already imported
    what the Snakefile imports, so it costs ~1 s instead of ~10 s of start-up; see tests/_snakemake_server.py.
    """

    def __init__(self) -> None:
        # -P: like the `snakemake` executable, nothing of tests/ on sys.path
        self._server = subprocess.Popen([sys.executable, "-P", str(REPO_ROOT / "tests" / "_snakemake_server.py")],
                                        cwd=REPO_ROOT, env=snakemake_env(), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def __call__(self, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        """`snakemake *args`; returncode -14 means it ran past `timeout` seconds."""
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            out.touch()
            err.touch()
            request = {"args": list(args), "cwd": str(REPO_ROOT), "env": snakemake_env(), "stdout": str(out),
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
        try:
            self._server.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a command still running (an interrupted session)
            self._server.kill()
            self._server.wait()


class WorkflowRun:
    """The whole test DAG (`snakemake --cores 2`, default target: every table, figure and notebook) on synthetic
    CIFAR-10 under `tmp`, running in the background from the moment it is created; `result()` waits for it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        write_synthetic_cifar10(tmp / "data", n_train=600, n_test=200)
        # The longest chain of jobs (backbone -> ... -> table13 -> its notebook) first, so the Table 1 jobs fill the
        # other core instead of leaving that chain to run alone at the end.
        chain_end = tmp / "results" / "notebooks" / "finetune_curves.ipynb"
        self._output = (tmp / "snakemake.out").open("w+")
        # At a lower CPU priority (nice 10, its jobs too): the tests in the foreground are the suite's longest chain
        # of work, so they get a core whenever they can use one and the DAG takes the rest.
        self._proc = subprocess.Popen(
            ["nice", "-n", "10", sys.executable, "-P", "-m", "snakemake", "--cores", "2",
             "--prioritize", str(chain_end), *workflow_config_args(tmp)], cwd=REPO_ROOT, env=snakemake_env(),
            stdout=self._output, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: stop() ends its jobs too

    def result(self, timeout: float = 1500) -> subprocess.CompletedProcess:
        """Wait for the run; its stdout and stderr together as `stdout`."""
        self._proc.wait(timeout=timeout)
        self._output.seek(0)
        return subprocess.CompletedProcess(self._proc.args, self._proc.returncode, self._output.read(), "")

    def stop(self) -> None:
        """End the run and its jobs if still running (an interrupted session)."""
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._output.close()


def slurm_partition() -> str:
    """The default partition of a SLURM cluster that answers (`sinfo`); where none does, scripts/start_slurm.sh
    starts a one-node one as root. Raises RuntimeError with the reason where there is none."""
    def answers() -> bool:
        if shutil.which("sinfo") is None:
            return False
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, check=False)
        return proc.returncode == 0 and bool(re.search(r"^(idle|mixed|allocated)", proc.stdout, re.M))

    if not answers():
        if os.geteuid() != 0:
            raise RuntimeError("no SLURM cluster answers (sinfo) and not root: run `sudo bash scripts/start_slurm.sh`")
        proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "start_slurm.sh")], capture_output=True,
                              text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/start_slurm.sh failed:\n{proc.stdout}{proc.stderr}")
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout.split()
    return next((p.rstrip("*") for p in out if p.endswith("*")), out[0])


COPIED_STAGES = ("backbone", "features", "zoo")  # what dag_upstream_copy copies


def dag_upstream_copy(dag: WorkflowRun, tmp: Path) -> list[str]:
    """The finished test DAG's backbone, features and zoo (with its split) copied to `tmp/results` with their times,
    and the config arguments of a run there on the DAG's data: Snakemake finds the copies up to date (it has no
    record of them, so only their times count) and starts after them. For tests of later rules that need a results
    folder of their own (they kill, rerun or add jobs) without training the first stages again."""
    proc = dag.result()
    assert proc.returncode == 0, proc.stdout[-5000:]
    for stage in COPIED_STAGES:
        shutil.copytree(dag.tmp / "results" / stage, tmp / "results" / stage)  # copy2: times kept
    return workflow_config_args(tmp, data=dag.tmp / "data")


def copied_stages_that_ran(tmp: Path, *rules: str) -> list[str]:
    """The rules of the copied stages (and `rules`) that ran in `tmp/results` all the same: those with a log there.
    Empty where Snakemake found `dag_upstream_copy`'s copies up to date."""
    logs = tmp / "results" / "logs" / "test"
    return [rule for rule in (*COPIED_STAGES, *rules) if (logs / f"{rule}.log").exists()]


class SlurmRun(WorkflowRun):
    """The test DAG's chain to the paper tables (backbone ... tables) through config/profiles/slurm on a SLURM
    cluster, under `tmp`, in the background from the session's start (tests/test_slurm.py): its 10 jobs spend most of
    their ~3.5 min waiting on the scheduler's polls, which then overlaps the other tests."""

    TABLES = ("table11", "table16", "table12", "seen_summary")

    def __init__(self, tmp: Path, partition: str) -> None:
        self.tmp = tmp
        write_synthetic_cifar10(tmp / "data", n_train=600, n_test=200)  # the same data as WorkflowRun's
        self._output = (tmp / "snakemake.out").open("w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "snakemake", *[str(tmp / "results" / f"{t}.csv") for t in self.TABLES],
             "--workflow-profile", "config/profiles/slurm",
             # what the one-node test cluster needs: its partition, no accounting (so no account and no sacct),
             # its memory; and, for a test, job states polled every 2 s instead of 40 s
             "--default-resources", f"slurm_partition={partition}", "runtime=30",
             "--set-resources", "train_rpg:mem_mb=2000", "--slurm-no-account", "--slurm-status-command", "squeue",
             "--slurm-init-seconds-before-status-checks", "2",
             "--slurm-logdir", str(tmp / "slurm_logs"), "--slurm-keep-successful-logs", "--retries", "0",
             *workflow_config_args(tmp)], cwd=REPO_ROOT, env=snakemake_env(), stdout=self._output,
            stderr=subprocess.STDOUT, start_new_session=True)


_snakemake: dict[str, SnakemakeRunner | WorkflowRun | str] = {}


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The test that waits on the session's SLURM run (tests/test_slurm.py) last: the run (~4 min, its jobs mostly
    waiting on the executor's polls) then overlaps every other test instead of stopping the suite at its place."""
    items.sort(key=lambda item: "slurm_dag" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session", autouse=True)
def _start_snakemake_early(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Before the first test: start what the selected tests need of Snakemake, so that it runs beside the tests
    before them (one thread each) on the second core. The test DAG (~250 s of work for one core) then no longer
    runs alone, and the snakemake_cli server's imports (~10 s) are done when it is first called."""
    if importlib.util.find_spec("snakemake") is not None:
        needed = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
        if "workflow_dag" in needed:
            _snakemake["dag"] = WorkflowRun(tmp_path_factory.mktemp("workflow"))
        if "snakemake_cli" in needed:
            _snakemake["cli"] = SnakemakeRunner()
        if "slurm_dag" in needed:
            try:
                _snakemake["slurm"] = SlurmRun(tmp_path_factory.mktemp("slurm"), slurm_partition())
            except RuntimeError as e:
                _snakemake["slurm"] = str(e)
    yield
    for name in ("dag", "slurm"):
        if isinstance(_snakemake.get(name), WorkflowRun):
            _snakemake.pop(name).stop()
    if "cli" in _snakemake:
        _snakemake.pop("cli").close()


@pytest.fixture(scope="session")
def snakemake_cli() -> SnakemakeRunner:
    """Runs `snakemake` command lines (skips the test where Snakemake is not installed)."""
    if "cli" not in _snakemake:
        pytest.skip("snakemake is not installed")
    return _snakemake["cli"]


@pytest.fixture(scope="session")
def workflow_dag() -> WorkflowRun:
    """The test DAG's run, started with the session (skips the test where Snakemake is not installed)."""
    if "dag" not in _snakemake:
        pytest.skip("snakemake is not installed")
    return _snakemake["dag"]


@pytest.fixture(scope="session")
def slurm_dag() -> SlurmRun:
    """The test DAG's run on SLURM, started with the session; skips (not root) or fails (root: CI) with the reason
    where no cluster answers and none could be started."""
    run = _snakemake.get("slurm")
    if run is None:
        pytest.skip("snakemake is not installed")
    if isinstance(run, str):
        if os.geteuid() == 0:
            pytest.fail(run)
        pytest.skip(run)
    return run


def mlp_state(seed: int) -> dict[str, torch.Tensor]:
    """The state dict of a tiny seeded MLP (3 -> 4 -> 2): a collection's checkpoint in CLI tests."""
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
                                                         torch.nn.Linear(4, 2)).state_dict().items()}


@pytest.fixture
def collection(tmp_path: Path) -> Path:
    """A folder of three tiny MLP checkpoints (`mlp_state`): a collection for `rpg train` in CLI tests."""
    folder = tmp_path / "ckpts"
    for s in range(3):
        save_safetensors_atomic(mlp_state(s), folder / f"c{s}.safetensors", {})
    return folder


def one_line_error(capsys, rc: int, *fragments: str) -> str:
    """The CLI's stderr after a refused command: exit code 2, one line, no traceback, naming every fragment."""
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err

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
