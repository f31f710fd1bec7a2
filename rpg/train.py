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
`val/*` columns of `train_log.csv`. Under `torchrun` with several processes, training is data parallel (DDP).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

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
from rpg.utils import seed_everything

Validator = Callable[[RPG], dict[str, float]]


class DiffusionObjective(nn.Module):
    """Wraps model + diffusion so that one forward call computes the loss (what DDP needs)."""

    def __init__(self, model: RPG, diffusion: GaussianDiffusion):
        super().__init__()
        self.model = model
        self.diffusion = diffusion

    def forward(self, x0: torch.Tensor, mask: torch.Tensor, picked: torch.Tensor, perm: torch.Tensor | None,
                cond: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        """Shapes: x0 (B, N, L); mask (N, L); picked (M,) flat indices into B*N tokens."""
        b, n, length = x0.shape
        proto = self.model.prototypes(b, perm, cond).reshape(b * n, -1)[picked]  # (M, D)
        x0_sel = x0.reshape(b * n, length)[picked]  # (M, L)
        mask_sel = mask.repeat(b, 1)[picked]  # (M, L)
        return self.diffusion.training_loss(self.model.denoiser, x0_sel, proto, mask_sel, generator=generator)


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


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = getattr(p, "_no_weight_decay", False) or p.ndim < 2 or "norm" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def train_rpg(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, cfg: TrainConfig, tokenizer: Tokenizer,
              tokens: torch.Tensor, out_dir: str | Path, *, cond: torch.Tensor | None = None, seed: int = 0,
              device: torch.device | str = "cpu", validate: Validator | None = None,
              tracker: Tracker | None = None, progress: bool = True,
              stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) a generator on `tokens` and write best/last checkpoints to `out_dir`.

    Args:
        tokens: (K, N, L) normalised tokens of K training checkpoints.
        cond: (K, condition_dim) task bits per checkpoint, for task-conditioned models.
        validate: called every `eval_every` steps on the (EMA) model; must return {"score": higher-is-better, ...}.
        stop_after: stop (as if killed) after this many steps of this call; for tests of resuming.
    Returns:
        summary dict (best step and score, final loss, seconds, peak memory).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    rank, world = _distributed()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    k, n, length = tokens.shape
    if model_cfg.condition == "task" and cond is None:
        raise ValueError("a task-conditioned RPG needs `cond` (one task embedding per checkpoint)")

    seed_everything(seed)
    model = RPG(model_cfg, tokenizer.layer_index, tokenizer.token_index,
                n_permutation_states=k if model_cfg.permutation_state else 0).to(device)
    diffusion = create_diffusion(diffusion_cfg)
    objective = DiffusionObjective(model, diffusion)
    ddp = nn.parallel.DistributedDataParallel(objective) if world > 1 else objective
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema else None
    data_gen = torch.Generator().manual_seed(seed * world + rank)
    noise_gen = torch.Generator(device=device).manual_seed(seed * world + rank + 1)
    start, best = 0, {"score": -math.inf, "step": -1}
    history: list[dict[str, float]] = []

    last_path, state_path = out_dir / "last.safetensors", out_dir / "last.opt.pt"
    fingerprint = _fingerprint(model_cfg, diffusion_cfg, cfg, tokens, cond, seed, world)
    state = load_training_state(state_path) if state_path.exists() else None
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

    tokens_dev = tokens.to(device)
    cond_dev = cond.to(device) if cond is not None else None
    mask = tokenizer.mask.to(device)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    tracker = tracker or Tracker()
    t0 = time.time()
    loss_ema = None
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    stopped_early = validate is not None and plateaued(start, best["step"], cfg)
    end = start if stopped_early else end
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not progress or rank != 0,
               desc="train RPG", dynamic_ncols=True)

    def checkpoint(step: int) -> None:
        if rank != 0:
            return
        save_training_state(state_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "data_gen": data_gen.get_state(),
            "noise_gen": noise_gen.get_state(), "step": step, "best_score": best["score"],
            "best_step": best["step"], "fingerprint": fingerprint,
            **({"ema": ema.state_dict()} if ema is not None else {}),
        })
        save_rpg(last_path, model, tokenizer, diffusion_cfg, step=step)  # a loadable copy of the same weights

    for step in bar:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, k, (cfg.batch_size,), generator=data_gen)
        picked = torch.randperm(cfg.batch_size * n, generator=data_gen)[: cfg.diffusion_batch]
        x0 = tokens_dev[idx.to(device)]
        perm = idx.to(device) if model.permutation is not None else None
        c = cond_dev[idx.to(device)] if cond_dev is not None else None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            loss = ddp(x0, mask, picked.to(device), perm, c, noise_gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - cfg.ema)
        loss_val = loss.item()
        loss_ema = loss_val if loss_ema is None else 0.98 * loss_ema + 0.02 * loss_val
        done = step + 1
        bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{lr:.2e}")
        record: dict[str, float] = {"step": done, "loss": loss_val, "lr": lr, "grad_norm": float(grad_norm)}
        if validate is not None and rank == 0 and (done % cfg.eval_every == 0 or done == cfg.steps):
            metrics = validate(ema if ema is not None else model)
            record.update({f"val/{key}": float(v) for key, v in metrics.items()})
            if metrics["score"] > best["score"]:
                best = {"score": float(metrics["score"]), "step": done}
                save_rpg(out_dir / "best.safetensors", ema if ema is not None else model, tokenizer, diffusion_cfg,
                         step=done, extra={"val": metrics})
            tqdm.write(f"step {done}: " + ", ".join(f"{key} {v:.4f}" for key, v in metrics.items()))
        if rank == 0:
            tracker.log(record, step=done)
            history.append(record)
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
                     step=final_step)
            best = {"score": best["score"], "step": final_step}
        _append_history(out_dir / "train_log.csv", history)
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
                 cond: torch.Tensor | None, seed: int, world: int) -> str:
    """Hash of everything a run's trajectory depends on; a run resumes only from a state with the same hash.

    `patience` decides only where a run ends, so a run stopped early resumes when it is raised (or turned off).
    """
    train = {key: v for key, v in asdict(cfg).items() if key != "patience"}
    h = hashlib.sha256(json.dumps([asdict(model_cfg), asdict(diffusion_cfg), train, seed, world],
                                  sort_keys=True, default=str).encode())
    for t in (tokens, cond):
        if t is not None:
            h.update(f"{tuple(t.shape)} {t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _append_history(path: Path, rows: list[dict[str, float]]) -> None:
    if not rows:
        return
    keys = sorted({key for row in rows for key in row}, key=lambda x: (x != "step", x))
    exists = path.exists()
    if exists:
        with path.open() as f:
            header = next(csv.reader(f), [])
        keys = header + [key for key in keys if key not in header]
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        if not exists:
            writer.writeheader()
        writer.writerows(rows)
