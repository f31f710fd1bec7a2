"""Training RPG on a collection of tokenised checkpoints.

Each step draws `batch_size` checkpoints, runs the recurrent model over all their tokens, then sends a random
subset of `diffusion_batch` tokens (with their prototypes) through the denoiser: the memory of a step depends on the
diffusion batch, not on the size of the generated model. Gradients flow through the prototypes into the recurrent
model (end to end).

The diffusion loss is no proxy for the quality of generated weights (a calibration prototype reached a lower loss
and collapsed), so training calls a user-supplied `validate(model) -> {"score": ...}` every `eval_every` steps and
keeps the checkpoint with the best score as `best.safetensors`. `last.opt.pt` (weights, optimizer, data and noise
generators) allows resuming, so a resumed run ends with the same weights as an uninterrupted one; `last.safetensors`
is a loadable copy of the same weights, written after it. With `patience`, training stops once that many validations
in a row have not beaten the best score (a plateau), `steps` being the maximum budget; the validation curve is the
`val/*` columns of `train_log.csv`. Under `torchrun` with several processes, training is data parallel (DDP):
`batch_size` and `diffusion_batch` are the global batch, every process draws the same step and trains on its share
of the checkpoints, and the result is the one-process result up to float round-off (tests/test_ddp.py).

A run owns its folder: a lock file refuses a second run into it, `train_log.csv` is appended step by step (a resumed
run first drops the rows after the step it resumes from), a run asked for another step count than the one in the
folder is refused unless `force`, and a NaN/Inf loss, gradient or weight stops training (TrainingDivergedError)
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
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

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
from rpg.utils import CheckpointError, first_non_finite, read_safetensors_metadata, seed_everything, write_csv_rows

Validator = Callable[[RPG], dict[str, float]]
LOCK_FILE = ".rpg.lock"


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
                denominator: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of the step's checkpoints `tokens[idx]` at the picked tokens.

        Shapes: tokens (K, N, L) the whole token set, idx (B,) the step's rows of it; mask (N, L); picked (M,) flat
        indices into the B*N tokens of the step; t (M,), noise (M, L) (drawn from `generator` when not given); see
        `GaussianDiffusion.training_loss` for `denominator`. Only the picked tokens are gathered (no (B, N, L) copy).
        """
        n = tokens.shape[1]
        proto = self.model.prototypes_at(picked, len(idx), perm, cond)  # (M, D)
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


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on OUT/.rpg.lock while training; a second writer into the folder is refused.

    flock: the kernel drops the lock when its process dies, so a killed run never leaves a stale lock.
    Only rank 0 of a torchrun job (RANK unset or 0) writes, so only it takes the lock.
    """
    if process_rank() != 0:
        yield
        return
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / LOCK_FILE).open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            raise RunConflictError(f"{out_dir} is in use by another training run ({owner}); wait for it to end or "
                                   "train into another folder") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _holding_run_lock(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Run `fn` (train_rpg) inside run_lock(out_dir)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> dict[str, Any]:
        out_dir = Path(inspect.signature(fn).bind(*args, **kwargs).arguments["out_dir"])
        with run_lock(out_dir):
            return fn(*args, **kwargs)
    return wrapper


@_holding_run_lock
def train_rpg(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, cfg: TrainConfig, tokenizer: Tokenizer,
              tokens: torch.Tensor, out_dir: str | Path, *, cond: torch.Tensor | None = None, seed: int = 0,
              device: torch.device | str = "cpu", validate: Validator | None = None,
              tracker: Tracker | None = None, progress: bool = True,
              stop_after: int | None = None, force: bool = False, metadata: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """Train (or resume) a generator on `tokens` and write best/last checkpoints to `out_dir`.

    Args:
        tokens: (K, N, L) normalised tokens of K training checkpoints.
        cond: (K, condition_dim) task bits per checkpoint, for task-conditioned models.
        validate: called every `eval_every` steps on the (EMA) model; must return {"score": higher-is-better, ...}.
        stop_after: stop (as if killed) after this many steps of this call; for tests of resuming.
        force: train from scratch over a run of another step count in `out_dir` (refused otherwise).
        metadata: stored in every generator file's metadata under "extra" (e.g. the domain names of the condition,
            which `rpg generate --domain` reads); not part of the run's fingerprint.
    Returns:
        summary dict (best step and score, final loss, seconds, peak memory).
    """
    out_dir = Path(out_dir)
    device = torch.device(device)
    rank, world = _distributed()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    k, n, length = tokens.shape
    if model_cfg.condition == "task" and cond is None:
        raise ValueError("a task-conditioned RPG needs `cond` (one task embedding per checkpoint)")
    if cfg.batch_size < world:
        raise ValueError(f"train.batch_size ({cfg.batch_size}) is the global batch of checkpoints per step, split "
                         f"between the {world} processes: it must be at least {world}")
    # Data parallel: every process draws the same global step (checkpoints, tokens, timesteps, noise) from the same
    # generators and takes the part of it that belongs to its own share of the checkpoints; the loss is normalised
    # by the global count, so the averaged gradient is the one-process gradient of the same global batch.
    k0, k1 = rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world

    seed_everything(seed)
    model = RPG(model_cfg, tokenizer.layer_index, tokenizer.token_index,
                n_permutation_states=k if model_cfg.permutation_state else 0).to(device)
    diffusion = create_diffusion(diffusion_cfg)
    objective = DiffusionObjective(model, diffusion)
    ddp = nn.parallel.DistributedDataParallel(objective) if world > 1 else objective
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay, cfg.position_lr_scale), lr=cfg.lr,
                                  betas=(0.9, 0.999))
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema else None
    data_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
    start, best = 0, {"score": -math.inf, "step": -1}
    history: list[dict[str, float]] = []

    last_path, state_path = out_dir / "last.safetensors", out_dir / "last.opt.pt"
    fingerprint = _fingerprint(model_cfg, diffusion_cfg, cfg, tokens, cond, seed, world)
    run_fingerprint = _fingerprint(model_cfg, diffusion_cfg, cfg, tokens, cond, seed, world, ignore_steps=True)
    state = load_training_state(state_path) if state_path.exists() else None
    if not force:
        _refuse_other_step_count(state, fingerprint, run_fingerprint, cfg.steps, out_dir)
    if state is not None and not (state.get("fingerprint") == fingerprint and
                                  (int(state["best_step"]) < 0 or (out_dir / "best.safetensors").exists())):
        # A leftover of a run on other data / settings (e.g. Snakemake re-running the rule after its inputs
        # changed), or a finished run whose best checkpoint was deleted: resuming would silently reuse stale weights.
        if rank == 0:
            print(f"not resuming from {state_path}: other data or settings, or best.safetensors is gone; "
                  "training from scratch")
        state = None
    if state is None and rank == 0:
        (out_dir / "train_log.csv").unlink(missing_ok=True)
    if state is not None:
        # The weights come from the training state itself: last.safetensors is written after it, so a kill between
        # the two writes must not pair new weights with an older optimizer state.
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        data_gen.set_state(state["data_gen"])
        noise_gen.set_state(state["noise_gen"])
        start, best = int(state["step"]), {"score": float(state["best_score"]), "step": int(state["best_step"])}
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        if rank == 0:
            print(f"resumed from {state_path} at step {start}")
            _truncate_log(out_dir / "train_log.csv", start)  # rows of steps after the checkpoint are redone

    tokens_dev = tokens.to(device)
    cond_dev = cond.to(device) if cond is not None else None
    mask = tokenizer.mask.to(device)
    mask_count = mask.sum(1).to(torch.float32)  # (N,) unmasked positions of each token
    use_bf16 = cfg.bf16 and device.type == "cuda"
    tracker = tracker or Tracker()
    t0 = time.time()
    loss_ema = None
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    stopped_early = validate is not None and plateaued(start, best["step"], cfg)
    if world > 1:  # rank 0 decides (only it needs a validator)
        flag = torch.tensor(float(stopped_early), device=device)
        dist.broadcast(flag, 0)
        stopped_early = bool(flag.item())
    end = start if stopped_early else end
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not progress or rank != 0,
               desc="train RPG", dynamic_ncols=True)

    def checkpoint(step: int) -> None:
        _check_weights(model, step, out_dir)
        if rank != 0:
            return
        save_training_state(state_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "data_gen": data_gen.get_state(),
            "noise_gen": noise_gen.get_state(), "step": step, "best_score": best["score"],
            "best_step": best["step"], "fingerprint": fingerprint, "run_fingerprint": run_fingerprint,
            "total_steps": cfg.steps,
            **({"ema": ema.state_dict()} if ema is not None else {}),
        })
        save_rpg(last_path, model, tokenizer, diffusion_cfg, step=step,  # a loadable copy of the same weights
                 extra=metadata)

    for step in bar:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        idx = torch.randint(0, k, (cfg.batch_size,), generator=data_gen)
        picked = torch.randperm(cfg.batch_size * n, generator=data_gen)[: cfg.diffusion_batch].to(device)
        t, noise = diffusion.draw(len(picked), length, device, tokens_dev.dtype, noise_gen)
        denominator = None
        if world > 1:
            denominator = mask_count[picked % n].sum().clamp_min(1.0) / world
            picked, t, noise = shard_step(k0, k1, picked, n, t, noise)
            idx = idx[k0:k1]
        idx = idx.to(device)
        perm = idx if model.permutation is not None else None
        c = cond_dev[idx] if cond_dev is not None else None
        objective.train()  # a validator (rank 0 only) may leave eval mode on; all processes' BatchNorms must train
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            loss = ddp(tokens_dev, idx, mask, picked, perm, c, t=t, noise=noise, denominator=denominator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:  # the global loss, for the log (each process holds its share of the sum)
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss = loss / world
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        _check_step(loss.item(), float(grad_norm), step + 1, out_dir)  # before the update: weights stay finite
        optimizer.step()
        if ema is not None:
            update_ema(ema, model, cfg.ema, step)
        loss_val = loss.item()
        loss_ema = loss_val if loss_ema is None else 0.98 * loss_ema + 0.02 * loss_val
        done = step + 1
        bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{lr:.2e}")
        record: dict[str, float] = {"step": done, "loss": loss_val, "lr": lr, "grad_norm": float(grad_norm)}
        if validate is not None and rank == 0 and (done % cfg.eval_every == 0 or done == cfg.steps):
            _check_weights(model, done, out_dir)
            metrics = validate(ema if ema is not None else model)
            record.update({f"val/{key}": float(v) for key, v in metrics.items()})
            if metrics["score"] > best["score"]:
                best = {"score": float(metrics["score"]), "step": done}
                save_rpg(out_dir / "best.safetensors", ema if ema is not None else model, tokenizer, diffusion_cfg,
                         step=done, extra={**(metadata or {}), "val": metrics})
            tqdm.write(f"step {done}: " + ", ".join(f"{key} {v:.4f}" for key, v in metrics.items()))
        if rank == 0:
            tracker.log(record, step=done)
            history.append(record)
            _append_history(out_dir / "train_log.csv", [record])  # as we go: the log survives a kill
        stopped_early = validate is not None and done < cfg.steps and plateaued(done, best["step"], cfg)
        if world > 1 and done % cfg.eval_every == 0:  # only rank 0 validates: all ranks stop together
            flag = torch.tensor(float(stopped_early), device=device)
            dist.broadcast(flag, 0)
            stopped_early = bool(flag.item())
        if done % cfg.save_every == 0 or done == cfg.steps or stopped_early:
            checkpoint(done)
        if stopped_early:
            end = done
            break
    bar.close()

    final_step = end
    if rank == 0:
        if final_step == cfg.steps and (validate is None or best["step"] < 0):
            # Without validation the final weights are the result.
            save_rpg(out_dir / "best.safetensors", ema if ema is not None else model, tokenizer, diffusion_cfg,
                     step=final_step, extra=metadata)
            best = {"score": best["score"], "step": final_step}
    summary = {
        "best_step": best["step"], "best_score": best["score"], "final_loss_ema": loss_ema,
        "steps": final_step, "max_steps": cfg.steps, "stopped_early": stopped_early,
        "hit_max_steps": final_step == cfg.steps, "finished": stopped_early or final_step == cfg.steps,
        "seconds": time.time() - t0, "n_checkpoints": k, "n_tokens": n,
        "token_size": length, "n_params_generated": tokenizer.n_params,
        "generator_params": sum(p.numel() for p in model.parameters()),
        "peak_cuda_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "model_config": asdict(model_cfg),
    }
    tracker.summary({k2: v for k2, v in summary.items() if not isinstance(v, dict)})
    return summary


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


def _refuse_other_step_count(state: dict | None, fingerprint: str, run_fingerprint: str, steps: int,
                             out_dir: Path) -> None:
    """A folder holding this run with another step count would be retrained from scratch (its trajectory, the
    learning-rate schedule included, depends on the count), overwriting best.safetensors: refuse instead."""
    if state is None or state.get("fingerprint") == fingerprint or state.get("run_fingerprint") != run_fingerprint:
        return
    raise RunConflictError(
        f"{out_dir} holds this run with {state.get('total_steps')} steps (at step {state['step']}); asking for "
        f"{steps} steps would retrain it from scratch and overwrite its best.safetensors. Pass --force "
        "(force=True) to do that, or train into another folder")


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


def _append_history(path: Path, rows: list[dict[str, float]]) -> None:
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
