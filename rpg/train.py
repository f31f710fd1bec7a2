"""Training RPG on a collection of tokenised checkpoints.

Each step draws `batch_size` checkpoints, runs the recurrent model over all their tokens, then sends a random
subset of `diffusion_batch` tokens (with their prototypes) through the denoiser: the memory of a step depends on the
diffusion batch, not on the size of the generated model. Gradients flow through the prototypes into the recurrent
model (end to end).

The diffusion loss is no proxy for the quality of generated weights (a calibration prototype reached a lower loss
and collapsed), so training calls a user-supplied `validate(model) -> {"score": ...}` every `eval_every` steps and
keeps the checkpoint with the best score as `best.safetensors`. `last.opt.pt` (weights, optimizer, data and noise
generators, and a copy of best.safetensors as it was then) allows resuming, so a resumed run ends with the same
weights as an uninterrupted one, also when best.safetensors was deleted before the run finished (Snakemake deletes
the outputs of a killed job); `last.safetensors` is a loadable copy of the same weights, written after it. With
`patience`, training stops once that many validations in a row have not beaten the best score (a plateau), `steps`
being the maximum budget; the validation curve is the `val/*` columns of `train_log.csv`. Under `torchrun` with
several processes, training is data parallel (DDP): `batch_size` and `diffusion_batch` are the global batch, every
process draws the same step and trains on its share of the checkpoints, and the result is the one-process result up
to float round-off (tests/test_ddp.py).

A run owns its folder: a lock file refuses a second run into it, `train_log.csv` is appended step by step (a resumed
run first drops the rows after the step it resumes from), a run asked for another step count, or on other data or
settings, than the one in the folder is refused unless `force` (then the earlier run's files are removed first, so
the folder never holds two runs), and a NaN/Inf loss, gradient or weight stops training (TrainingDivergedError)
before a non-finite weight is written.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import hashlib
import inspect
import json
import math
import os
import socket
import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from rpg.checkpoint import load_training_state, save_rpg, save_training_state
from rpg.config import DiffusionConfig, ModelConfig, TrainConfig
from rpg.diffusion import GaussianDiffusion, create_diffusion
from rpg.model import RPG
from rpg.tokenize import Tokenizer
from rpg.tracking import Tracker
from rpg.utils import (CheckpointError, atomic_path, first_non_finite, read_safetensors_metadata, seed_everything,
                       write_csv_rows, write_json_atomic)
from rpg.vision.preprocess import resolve_amp

Validator = Callable[[RPG], dict[str, float]]
LOCK_FILE = ".rpg.lock"
# What a run writes into its folder besides train_log.csv: removed when a forced run replaces another one.
RUN_FILES = ("last.opt.pt", "last.safetensors", "best.safetensors", "summary.json")


class RunConflictError(ValueError):
    """The output folder belongs to another run (one still writing, or one of another step count)."""


class TrainingDivergedError(RuntimeError):
    """The loss, a gradient or a weight became NaN/Inf; the last checkpoint written before it is kept."""


class DiffusionObjective(nn.Module):
    """Wraps model + diffusion so that one forward call computes the loss (what DDP needs)."""

    def __init__(self, model: RPG, diffusion: GaussianDiffusion):
        super().__init__()
        self.model = model
        self.diffusion = diffusion

    def forward(self, tokens: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor, picked: torch.Tensor,
                perm: torch.Tensor | None, cond: torch.Tensor | None, generator: torch.Generator | None = None, *,
                t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                denominator: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of the step's checkpoints `tokens[idx]` at the picked tokens.

        Shapes: tokens (K, N, L) the whole token set, idx (B,) the step's rows of it; mask (N, L); picked (M,) flat
        indices into the B*N tokens of the step; t (M,), noise (M, L) (drawn from `generator` when not given); see
        `GaussianDiffusion.training_loss` for `denominator`. Only the picked tokens are gathered (no (B, N, L) copy).
        drop (B,) bool: checkpoints trained with the null task code (rpg.condition_dropout).
        """
        n = tokens.shape[1]
        proto = self.model.prototypes_at(picked, len(idx), perm, cond, drop)  # (M, D)
        x0_sel = tokens[idx[picked // n], picked % n]  # (M, L)
        mask_sel = mask[picked % n]  # (M, L): no (B*N, L) copy of the mask
        return self.diffusion.training_loss(self.model.denoiser, x0_sel, proto, mask_sel, generator=generator,
                                            t=t, noise=noise, denominator=denominator)


def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """Move the EMA copy's weights towards the model's after optimizer step `step` (0-based); copy its buffers.

    The decay is warmed up, min(decay, (1 + step) / (10 + step)), so that the average forgets the random initial
    weights within the first few hundred steps instead of carrying e.g. 0.999^800 = 45 % of them at step 800.
    Buffers (the denoiser's BatchNorm running statistics) are copied, not averaged: an EMA copy that kept its
    initial statistics (mean 0, variance 1) generates at chance however good its weights are.
    """
    rate = min(decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1.0 - rate)
        for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
            be.copy_(bm)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr` at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def plateaued(step: int, best_step: int, cfg: TrainConfig) -> bool:
    """Whether `cfg.patience` validations (at multiples of `eval_every`) after the best one have passed by `step`.

    Computed from the best step alone, so a resumed run of a run that stopped early stops again at once.
    """
    if cfg.patience is None or best_step < 0:
        return False
    return step // cfg.eval_every - best_step // cfg.eval_every >= cfg.patience


def _param_groups(model: nn.Module, weight_decay: float, position_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: weight decay on matrices only; a learnable position table in its own group whose rate is
    `position_lr_scale` times the schedule's (`lr_scale`, applied each step)."""
    decay, no_decay, position = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name == "position.table" and position_lr_scale != 1.0:
            position.append(p)
            continue
        skip = getattr(p, "_no_weight_decay", False) or p.ndim < 2 or "norm" in name
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if position:
        groups.append({"params": position, "weight_decay": 0.0, "lr_scale": position_lr_scale})
    return groups


def process_rank() -> int:
    """This process's rank in a torchrun job (0 outside one): only rank 0 writes files."""
    return int(os.environ.get("RANK", "0"))


def shard_step(k0: int, k1: int, picked: torch.Tensor, n: int, t: torch.Tensor, noise: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One process's part of a global step: the picked tokens (flat indices into the global batch of checkpoints,
    `n` tokens each) that belong to its checkpoints k0..k1-1, re-indexed into them, with their timesteps and noise.

    Shapes: picked (M,), t (M,), noise (M, L) -> (m,), (m,), (m, L).
    """
    mine = (picked >= k0 * n) & (picked < k1 * n)
    return picked[mine] - k0 * n, t[mine], noise[mine]


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


# Folders whose lock the running code holds for its callees (run_lock(..., callees_share=True)).
_SHARED_WITH_CALLEES: ContextVar[frozenset[Path]] = ContextVar("rpg_run_lock_shared", default=frozenset())


@contextlib.contextmanager
def run_lock(out_dir: Path, *, callees_share: bool = False, user: str = "training run") -> Iterator[None]:
    """Hold an exclusive lock on OUT/.rpg.lock while training (or generating: `rpg generate` takes the same lock);
    a second writer into the folder is refused.

    flock: the kernel drops the lock when its process dies, so a killed run never leaves a stale lock (only the
    file, taken over by the next run); the holder removes the file when it is done, so a folder keeps only results.
    Only rank 0 of a torchrun job (RANK unset or 0) writes, so only it takes the lock.
    `callees_share`: the caller uses the folder before training (`rpg train` checks that it can write there), so
    it takes the lock first, before any write, and the code it calls (`train_rpg`) runs under it; without it, a
    second lock on a held folder is refused, in this process too.
    `user`: what holds the lock, as a refused writer is told ("training run", "rpg generate").
    """
    out_dir = Path(out_dir)
    if process_rank() != 0 or out_dir.resolve() in _SHARED_WITH_CALLEES.get():
        yield
        return
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir / LOCK_FILE
    with _locked_file(lock_path) as f:
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n{user}\n")
        f.flush()
        shared = _SHARED_WITH_CALLEES.set(_SHARED_WITH_CALLEES.get() | {out_dir.resolve()}) if callees_share else None
        try:
            yield
        finally:
            if shared is not None:
                _SHARED_WITH_CALLEES.reset(shared)
            lock_path.unlink(missing_ok=True)  # before the unlock: a process that opened it sees it gone and retries
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _locked_file(path: Path) -> Iterator[IO[str]]:
    """`path` opened and flocked by this process; RunConflictError naming the holder if another process holds it.

    The holder removes the file when it is done, so a lock taken on a file that was removed (or replaced) between
    opening and locking it is no lock on the folder: it is dropped and taken again on the file now there.
    """
    import fcntl

    while True:
        f = path.open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner, _, holder = f.read().strip().partition("\n")
            f.close()
            raise RunConflictError(f"{path.parent} is in use by another {holder or 'training run'} "
                                   f"({owner or 'another process'}); wait for it to end or choose another "
                                   "folder") from None
        try:
            now = os.stat(path)
            current = (now.st_dev, now.st_ino) == (os.fstat(f.fileno()).st_dev, os.fstat(f.fileno()).st_ino)
        except FileNotFoundError:
            current = False
        if current:
            break
        f.close()
    with f:
        yield f


def _holding_run_lock(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Run `fn` (train_rpg) inside run_lock(out_dir)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> dict[str, Any]:
        out_dir = Path(inspect.signature(fn).bind(*args, **kwargs).arguments["out_dir"])
        with run_lock(out_dir):
            return fn(*args, **kwargs)
    return wrapper


@dataclass(frozen=True)
class _Processes:
    """This process of a torchrun job, or the only one (rank 0 of 1): only the main process (rank 0) validates and
    writes files, and the others follow its decisions."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def join(cls, device: torch.device | str) -> _Processes:
        """Join the torchrun job if there is one (initialising its process group); under CUDA, each process on the
        GPU of its LOCAL_RANK."""
        rank, world = _distributed()
        device = torch.device(device)
        if world > 1 and device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        return cls(rank, world, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, batch_size: int) -> tuple[int, int]:
        """This process's checkpoints k0..k1-1 of a global batch of `batch_size`."""
        return self.rank * batch_size // self.world, (self.rank + 1) * batch_size // self.world

    def main_says(self, flag: bool) -> bool:
        """The main process's `flag`, on every process."""
        if self.world == 1:
            return flag
        value = torch.tensor(float(flag), device=self.device)
        dist.broadcast(value, 0)
        return bool(value.item())

    def mean(self, loss: torch.Tensor) -> torch.Tensor:
        """The global loss, for the log (each process holds its share of the sum)."""
        if self.world == 1:
            return loss
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        return loss / self.world


@dataclass
class _RunState:
    """What changes as a run trains, and what last.opt.pt holds to resume it (the learning rate is `lr_at(step)`;
    the patience left, `plateaued(step, best_step)`)."""

    model: RPG
    ema: RPG | None
    optimizer: torch.optim.Optimizer
    data_gen: torch.Generator  # draws the checkpoints and tokens of each step
    noise_gen: torch.Generator  # draws the timesteps and noise of each step
    step: int = 0  # optimizer steps done
    best_score: float = -math.inf
    best_step: int = -1
    best_file: torch.Tensor | None = None  # the bytes (uint8) of best.safetensors as the main process wrote it

    @property
    def scored(self) -> RPG:
        """The weights that are validated and kept as best.safetensors: the EMA copy's if there is one."""
        return self.ema if self.ema is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "data_gen": self.data_gen.get_state(), "noise_gen": self.noise_gen.get_state(), "step": self.step,
                "best_score": self.best_score, "best_step": self.best_step,
                **({"best_file": self.best_file} if self.best_file is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from last.opt.pt's state. The weights come from it, not from last.safetensors: that is written
        after it, so a kill between the two writes must not pair new weights with an older optimizer state."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.data_gen.set_state(state["data_gen"])
        self.noise_gen.set_state(state["noise_gen"])
        self.step = int(state["step"])
        self.best_score, self.best_step = float(state["best_score"]), int(state["best_step"])
        self.best_file = state.get("best_file")
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])


@dataclass
class _RunFolder:
    """The run's folder and what it writes there; only the main process writes (the methods do nothing elsewhere)."""

    path: Path
    is_main: bool
    tokenizer: Tokenizer
    diffusion_cfg: DiffusionConfig
    metadata: dict[str, Any] | None  # stored in every generator file
    tracker: Tracker
    identity: dict[str, Any]  # the run's fingerprints and step count, stored in last.opt.pt

    @property
    def state_path(self) -> Path:
        return self.path / "last.opt.pt"

    def say(self, message: str) -> None:
        if self.is_main:
            print(message)

    @property
    def best_path(self) -> Path:
        return self.path / "best.safetensors"

    def resumable_state(self, force: bool) -> dict[str, Any] | None:
        """last.opt.pt if it belongs to this run, else None, the folder cleared of an earlier run's files.

        Raises RunConflictError if the folder holds another run (this one with another step count, or one on other
        data or settings), unless `force`: training there would overwrite its checkpoints and leave the rest beside
        the new log. With `force` (the workflow's choice: Snakemake re-runs a rule after its inputs changed) the
        earlier run's files are removed and training starts from scratch.

        Snakemake deletes a killed job's outputs (best.safetensors) before it reruns it: an unfinished run restores
        best.safetensors from the copy in last.opt.pt and resumes. A finished run whose best.safetensors is gone
        (`snakemake --forcerun`, a user who deleted it) starts clean: resuming would silently reuse stale weights.
        """
        state = load_training_state(self.state_path) if self.state_path.exists() else None
        if state is None:
            return None
        if state.get("fingerprint") != self.identity["fingerprint"]:
            if not force:
                _refuse_other_run(state, self.identity, self.path)
            self._start_clean("it held a run of another step count" if state.get("run_fingerprint") ==
                              self.identity["run_fingerprint"] else "it held a run on other data or settings")
            return None
        if int(state["best_step"]) >= 0 and not self.best_path.exists():
            if state.get("best_file") is None:  # a last.opt.pt of an older version
                self._start_clean("best.safetensors is gone and last.opt.pt holds no copy of it")
                return None
            if state["finished"]:
                self._start_clean("the run had finished and best.safetensors is gone")
                return None
            if self.is_main:
                with atomic_path(self.best_path) as tmp:
                    state["best_file"].numpy().tofile(tmp)
            self.say(f"restored {self.best_path} (step {int(state['best_step'])}) from {self.state_path}")
        return state

    def _start_clean(self, reason: str) -> None:
        """Remove an earlier run's checkpoints and record (the log goes in restart_log) and say so."""
        if not self.is_main:
            return
        removed = [name for name in RUN_FILES if (self.path / name).exists()]
        for name in removed:
            (self.path / name).unlink()
        self.say(f"not resuming in {self.path}: {reason}; removed the earlier run's {', '.join(removed)} and "
                 "training from scratch")

    def restart_log(self, step: int) -> None:
        """Drop train_log.csv's rows after `step` (all of them when starting from scratch): a resume redoes them."""
        if not self.is_main:
            return
        if step == 0:
            (self.path / "train_log.csv").unlink(missing_ok=True)
        else:
            _truncate_log(self.path / "train_log.csv", step)

    def log(self, record: dict[str, float]) -> None:
        if self.is_main:
            self.tracker.log(record, step=int(record["step"]))
            _append_log(self.path / "train_log.csv", [record])  # as we go: the log survives a kill

    def save_last(self, run: _RunState, finished: bool) -> None:
        """last.opt.pt, then last.safetensors, a loadable copy of the same weights (every process checks them).
        `finished`: the run ends at this step (its last step, or a plateau)."""
        _check_weights(run.model, run.step, self.path)
        if not self.is_main:
            return
        save_training_state(self.state_path, {
            **run.state_dict(), **self.identity, "finished": finished,
            **({"ema": run.ema.state_dict()} if run.ema is not None else {})})
        save_rpg(self.path / "last.safetensors", run.model, self.tokenizer, self.diffusion_cfg, step=run.step,
                 extra=self.metadata)

    def save_best(self, model: RPG, step: int, extra: dict[str, Any] | None) -> torch.Tensor | None:
        """Write best.safetensors; return its bytes (uint8), which last.opt.pt keeps (None off the main process)."""
        if not self.is_main:
            return None
        save_rpg(self.best_path, model, self.tokenizer, self.diffusion_cfg, step=step, extra=extra)
        return torch.frombuffer(bytearray(self.best_path.read_bytes()), dtype=torch.uint8)


@dataclass(frozen=True)
class _Data:
    """The training set on the device: tokens (K, N, L), task bits (K, C) or None, the token mask (N, L) and the
    count of unmasked positions of each token (N,)."""

    tokens: torch.Tensor
    cond: torch.Tensor | None
    mask: torch.Tensor
    mask_count: torch.Tensor


class _Batch(NamedTuple):
    """This process's share of a global step: its checkpoints' rows idx (b,), the picked tokens (m,) (flat indices
    into its b*N tokens) with their timesteps (m,) and noise (m, L), the checkpoints' permutation states and task
    bits (or None), and the loss's denominator (the global one under DDP, else None); drop (b,) bool: the
    checkpoints whose task code is dropped this step (None without rpg.condition_dropout)."""

    idx: torch.Tensor
    picked: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    perm: torch.Tensor | None
    cond: torch.Tensor | None
    denominator: torch.Tensor | None
    drop: torch.Tensor | None = None


@_holding_run_lock
def train_rpg(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, cfg: TrainConfig, tokenizer: Tokenizer,
              tokens: torch.Tensor, out_dir: str | Path, *, cond: torch.Tensor | None = None, seed: int = 0,
              device: torch.device | str = "cpu", validate: Validator | None = None,
              tracker: Tracker | None = None, progress: bool = True,
              stop_after: int | None = None, force: bool = False, metadata: dict[str, Any] | None = None,
              files: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or resume) a generator on `tokens` and write best/last checkpoints to `out_dir`.

    Args:
        tokens: (K, N, L) normalised tokens of K training checkpoints.
        cond: (K, condition_dim) task bits per checkpoint, for task-conditioned models.
        validate: called every `eval_every` steps on the (EMA) model; must return {"score": higher-is-better, ...}.
        stop_after: stop (as if killed) after this many steps of this call; for tests of resuming.
        force: train from scratch over another run in `out_dir` (another step count, other data or settings),
            removing its files first (refused otherwise).
        files: JSON documents (file name -> content) the caller's run keeps in `out_dir` (a collection's record,
            its layout), written once the run is accepted: a refused run writes nothing.
        metadata: stored in every generator file's metadata under "extra" (e.g. the domain names of the condition,
            which `rpg generate --domain` reads); not part of the run's fingerprint.
    Returns:
        summary dict (best step and score, final loss, seconds, peak memory).
    """
    out_dir = Path(out_dir)
    procs = _Processes.join(device)
    if procs.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    k, n, length = tokens.shape
    if model_cfg.condition == "task" and cond is None:
        raise ValueError("a task-conditioned RPG needs `cond` (one task embedding per checkpoint)")
    if cfg.batch_size < procs.world:
        raise ValueError(f"train.batch_size ({cfg.batch_size}) is the global batch of checkpoints per step, split "
                         f"between the {procs.world} processes: it must be at least {procs.world}")

    # Start or resume: the weights drawn from `seed` (the same on every process), then the state of last.opt.pt if
    # it belongs to this run.
    seed_everything(seed)
    model = RPG(model_cfg, tokenizer.layer_index, tokenizer.token_index,
                n_permutation_states=k if model_cfg.permutation_state else 0).to(procs.device)
    diffusion = create_diffusion(diffusion_cfg)
    objective = DiffusionObjective(model, diffusion)
    if procs.world > 1:
        objective = nn.parallel.DistributedDataParallel(objective)
    run = _RunState(model=model,
                    optimizer=torch.optim.AdamW(_param_groups(model, cfg.weight_decay, cfg.position_lr_scale),
                                                lr=cfg.lr, betas=(0.9, 0.999)),
                    ema=copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema else None,
                    data_gen=torch.Generator().manual_seed(seed),
                    noise_gen=torch.Generator(device=procs.device).manual_seed(seed + 1))
    identity = {"fingerprint": _fingerprint(model_cfg, diffusion_cfg, cfg, tokens, cond, seed, procs.world),
                "run_fingerprint": _fingerprint(model_cfg, diffusion_cfg, cfg, tokens, cond, seed, procs.world,
                                                ignore_steps=True),
                "total_steps": cfg.steps}
    tracker = tracker or Tracker()
    folder = _RunFolder(out_dir, procs.is_main, tokenizer, diffusion_cfg, metadata, tracker, identity)
    state = folder.resumable_state(force)
    for name, content in (files or {}).items() if procs.is_main else ():
        write_json_atomic(out_dir / name, content)
    if state is not None:
        run.load_state_dict(state)
        folder.say(f"resumed from {folder.state_path} at step {run.step}")
    folder.restart_log(run.step)

    mask = tokenizer.mask.to(procs.device)
    data = _Data(tokens.to(procs.device), cond.to(procs.device) if cond is not None else None, mask,
                 mask_count=mask.sum(1).to(torch.float32))
    t0 = time.time()
    loss_ema = None
    # Train up to `steps` (or `stop_after` more); a run that stopped on a plateau stops again at once (rank 0 decides
    # when to stop: only it needs a validator).
    stopped_early = procs.main_says(validate is not None and plateaued(run.step, run.best_step, cfg))
    end = cfg.steps if stop_after is None else min(cfg.steps, run.step + stop_after)
    end = run.step if stopped_early else end
    bar = tqdm(range(run.step, end), initial=run.step, total=cfg.steps, disable=not progress or not procs.is_main,
               desc="train RPG", dynamic_ncols=True)
    for _ in bar:
        # Draw the global step's batch, the same on every process, and take this process's share of it.
        batch = _draw_batch(run, data, diffusion, cfg, procs)

        # The step.
        record = _train_step(run, objective, data, batch, cfg, procs, out_dir)

        # After the step: log, validate (rank 0), save, stop on a plateau (all processes together, as rank 0 says).
        done = run.step
        loss_ema = record["loss"] if loss_ema is None else 0.98 * loss_ema + 0.02 * record["loss"]
        bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{record['lr']:.2e}")
        if validate is not None and procs.is_main and (done % cfg.eval_every == 0 or done == cfg.steps):
            record.update(_validate(run, validate, folder))
        folder.log(record)
        stopped_early = validate is not None and done < cfg.steps and plateaued(done, run.best_step, cfg)
        if done % cfg.eval_every == 0:
            stopped_early = procs.main_says(stopped_early)
        if done % cfg.save_every == 0 or done == cfg.steps or stopped_early:
            folder.save_last(run, finished=done == cfg.steps or stopped_early)
        if stopped_early:
            break
    bar.close()

    # The end: without validation (or without any score), the final weights are the result.
    if procs.is_main and run.step == cfg.steps and (validate is None or run.best_step < 0):
        folder.save_best(run.scored, run.step, metadata)
        run.best_step = run.step
    summary = {
        "best_step": run.best_step, "best_score": run.best_score, "final_loss_ema": loss_ema,
        "steps": run.step, "max_steps": cfg.steps, "stopped_early": stopped_early,
        "hit_max_steps": run.step == cfg.steps, "finished": stopped_early or run.step == cfg.steps,
        "seconds": time.time() - t0, "n_checkpoints": k, "n_tokens": n,
        "token_size": length, "n_params_generated": tokenizer.n_params,
        "generator_params": sum(p.numel() for p in model.parameters()),
        "peak_cuda_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if procs.device.type == "cuda" else None,
        "model_config": asdict(model_cfg),
    }
    tracker.summary({key: v for key, v in summary.items() if not isinstance(v, dict)})
    return summary


def _draw_batch(run: _RunState, data: _Data, diffusion: GaussianDiffusion, cfg: TrainConfig,
                procs: _Processes) -> _Batch:
    """Draw the global step from the run's generators (`batch_size` checkpoints with replacement, `diffusion_batch`
    of their tokens, their timesteps and noise), the same on every process, and keep this process's share of it.

    Data parallel: the loss is normalised by the global count of the step's unmasked positions, so the averaged
    gradient is the one-process gradient of the same global batch.
    """
    k, n, length = data.tokens.shape
    idx = torch.randint(0, k, (cfg.batch_size,), generator=run.data_gen)
    picked = torch.randperm(cfg.batch_size * n, generator=run.data_gen)[: cfg.diffusion_batch].to(procs.device)
    p_drop = run.model.cfg.condition_dropout if data.cond is not None else 0.0
    # drawn only when used, so that runs without condition dropout keep their random streams
    drop = torch.rand(cfg.batch_size, generator=run.data_gen) < p_drop if p_drop > 0 else None
    t, noise = diffusion.draw(len(picked), length, procs.device, data.tokens.dtype, run.noise_gen)
    denominator = None
    if procs.world > 1:
        denominator = data.mask_count[picked % n].sum().clamp_min(1.0) / procs.world
        k0, k1 = procs.share(cfg.batch_size)
        picked, t, noise = shard_step(k0, k1, picked, n, t, noise)
        idx = idx[k0:k1]
        drop = drop[k0:k1] if drop is not None else None
    idx = idx.to(procs.device)
    return _Batch(idx, picked, t, noise, perm=idx if run.model.permutation is not None else None,
                  cond=data.cond[idx] if data.cond is not None else None, denominator=denominator,
                  drop=drop.to(procs.device) if drop is not None else None)


def _train_step(run: _RunState, objective: nn.Module, data: _Data, batch: _Batch, cfg: TrainConfig,
                procs: _Processes, out_dir: Path) -> dict[str, float]:
    """One optimizer step on this process's share of the global step; returns its row of the log."""
    lr = lr_at(run.step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    objective.train()  # a validator (rank 0 only) may leave eval mode on; all processes' BatchNorms must train
    with torch.autocast(procs.device.type, dtype=torch.bfloat16, enabled=resolve_amp(cfg.amp, procs.device)):
        loss = objective(data.tokens, batch.idx, data.mask, batch.picked, batch.perm, batch.cond, t=batch.t,
                         noise=batch.noise, denominator=batch.denominator, drop=batch.drop)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    loss = procs.mean(loss)
    grad_norm = float(nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip or float("inf")))
    _check_step(loss.item(), grad_norm, run.step + 1, out_dir)  # before the update: weights stay finite
    run.optimizer.step()
    if run.ema is not None:
        update_ema(run.ema, run.model, cfg.ema, run.step)
    run.step += 1
    return {"step": run.step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm}


def _validate(run: _RunState, validate: Validator, folder: _RunFolder) -> dict[str, float]:
    """Score the run's weights (the EMA copy's if any) and keep them as best.safetensors when they beat the best
    score so far; returns the `val/*` columns of the log."""
    _check_weights(run.model, run.step, folder.path)
    metrics = validate(run.scored)
    if metrics["score"] > run.best_score:
        run.best_score, run.best_step = float(metrics["score"]), run.step
        run.best_file = folder.save_best(run.scored, run.step, {**(folder.metadata or {}), "val": metrics})
    tqdm.write(f"step {run.step}: " + ", ".join(f"{key} {v:.4f}" for key, v in metrics.items()))
    return {f"val/{key}": float(v) for key, v in metrics.items()}


def _fingerprint(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, cfg: TrainConfig, tokens: torch.Tensor,
                 cond: torch.Tensor | None, seed: int, world: int, *, ignore_steps: bool = False) -> str:
    """Hash of everything a run's trajectory depends on; a run resumes only from a state with the same hash.

    ignore_steps: the hash of "the same run but for its step count" (to refuse, not retrain, a changed count).
    `patience` decides only where a run ends, so a run stopped early resumes when it is raised (or turned off).
    """
    train = {key: v for key, v in asdict(cfg).items() if key != "patience"}
    if ignore_steps:
        train["steps"] = None
    model = {key: v for key, v in asdict(model_cfg).items()  # recomputation only: the same trajectory
             if key not in ("checkpoint_activations", "checkpoint_tokens")}
    h = hashlib.sha256(json.dumps([model, asdict(diffusion_cfg), train, seed, world],
                                  sort_keys=True, default=str).encode())
    for t in (tokens, cond):
        if t is not None:
            h.update(f"{tuple(t.shape)} {t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _refuse_other_run(state: dict, identity: dict[str, Any], out_dir: Path) -> None:
    """A folder holding this run with another step count would be retrained from scratch (its trajectory, the
    learning-rate schedule included, depends on the count), overwriting best.safetensors; one holding a run on other
    data or settings would be overwritten too: refuse instead."""
    if state.get("run_fingerprint") == identity["run_fingerprint"]:
        raise RunConflictError(
            f"{out_dir} holds this run with {state.get('total_steps')} steps (at step {state['step']}); asking for "
            f"{identity['total_steps']} steps would retrain it from scratch and overwrite its best.safetensors. Pass "
            "--force (force=True) to do that, or train into another folder")
    raise RunConflictError(
        f"{out_dir} holds a run on other data or settings (at step {state['step']} of {state.get('total_steps')}); "
        "this one would overwrite its checkpoints and leave the rest beside its own. Pass --force (force=True) to "
        "remove that run and train from scratch, or train into another folder")


def _last_good(out_dir: Path) -> str:
    last = out_dir / "last.safetensors"
    try:
        return f"the last good checkpoint, {last} (step {read_safetensors_metadata(last)['step']}), is kept"
    except (CheckpointError, KeyError):
        return "no checkpoint was written before it"


def _check_step(loss: float, grad_norm: float, step: int, out_dir: Path) -> None:
    """Divergence guard before the optimizer step: a NaN/Inf loss or gradient norm ends training."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise TrainingDivergedError(
            f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm} (not finite); the weights "
            f"were not updated and {_last_good(out_dir)}. Lower train.lr or set train.grad_clip, then train again")


def _check_weights(model: nn.Module, step: int, out_dir: Path) -> None:
    """Divergence guard before a checkpoint or a validation: no non-finite weight is ever written."""
    bad = first_non_finite(model.state_dict())
    if bad is not None:
        raise TrainingDivergedError(f"training diverged by step {step}: weight '{bad}' is not finite; nothing of "
                                    f"this step was written and {_last_good(out_dir)}. Lower train.lr, then train "
                                    "again")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows after `step` (steps a killed run did after its last checkpoint; a resume redoes them)."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    kept = [r for r in rows if r.get("step") and int(float(r["step"])) <= step]
    if len(kept) < len(rows):
        write_csv_rows(path, header, kept)


def _append_log(path: Path, rows: list[dict[str, float]]) -> None:
    """Append rows; a row with a column the file lacks (the first validation) rewrites it with the wider header."""
    if not rows:
        return
    keys = sorted({key for row in rows for key in row}, key=lambda x: (x != "step", x))
    header: list[str] = []
    if path.exists():
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
    if header and set(keys) - set(header):
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
        write_csv_rows(path, header + [k for k in keys if k not in header], old + rows)
        return
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header or keys, extrasaction="ignore")
        if not header:
            writer.writeheader()
        writer.writerows(rows)
