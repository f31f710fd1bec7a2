"""Unconditional RPG on a collection of checkpoints of one architecture (paper §2a, Table 1).

The collection is a list of state dicts with the same keys and shapes. Each checkpoint gets its own permutation
state when ``model_cfg.permutation_state`` is on, so checkpoints of several training runs (different symmetry basins)
do not blur together. Validation generates a few complete models and scores each with a user function (e.g.
accuracy on held-out training images); the best-scoring generator is kept as ``best.safetensors``.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from rpg.checkpoint import load_rpg
from rpg.config import DiffusionConfig, GenerateConfig, ModelConfig, TrainConfig
from rpg.generate import sample_models
from rpg.model import RPG
from rpg.tokenize import Tokenizer, check_collection
from rpg.tracking import Tracker
from rpg.train import run_lock, train_rpg
from rpg.utils import write_json_atomic

ScoreFn = Callable[[dict[str, torch.Tensor]], float]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB); one process per training gives its peak."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (2**20 if sys.platform == "darwin" else 2**10)


def make_score_validator(tokenizer: Tokenizer, diffusion_cfg: DiffusionConfig, score_fn: ScoreFn, n_samples: int,
                         seed: int, amp: str = "none") -> Callable[[RPG], dict[str, float]]:
    """Validation hook for `train_rpg`: generate `n_samples` models, score each, report mean / best / min.

    `amp` (train.amp's modes) is the precision of the validation samples: the generator's own, so the step kept is
    chosen on models drawn the way its final samples are.
    """

    def validate(model: RPG) -> dict[str, float]:
        start = time.time()
        scores = torch.tensor([float(score_fn(sd)) for sd in
                               sample_models(model, tokenizer, diffusion_cfg, n_samples, seed=seed, amp=amp)])
        return {"score": float(scores.mean()), "best": float(scores.max()), "min": float(scores.min()),
                "seconds": time.time() - start}

    return validate


def train_on_collection(state_dicts: Sequence[Mapping[str, torch.Tensor]], out_dir: str | Path, *,
                        model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, train_cfg: TrainConfig,
                        seed: int = 0, device: torch.device | str = "cpu", score_fn: ScoreFn | None = None,
                        names: Sequence[str] | None = None, tracker: Tracker | None = None,
                        progress: bool = True, stop_after: int | None = None, force: bool = False,
                        files: dict[str, object] | None = None) -> dict:
    """Tokenise a collection and train (or resume) an unconditional RPG on it.

    Args:
        state_dicts: the checkpoints (same keys and shapes); checkpoint i gets permutation state i.
        out_dir: receives best.safetensors, last.* (resume), train_log.csv, layout.json and summary.json.
        model_cfg: must have ``condition == "none"``.
        score_fn: state dict -> higher-is-better score (e.g. validation accuracy); without it the final
            weights are kept.
        names: labels of the checkpoints (file names) for error messages.
        stop_after: stop after this many steps of this call (as if killed), for resume tests.
        force: retrain from scratch over another run in `out_dir` (refused otherwise; see `train_rpg`).
        files: more JSON documents for `out_dir` (name -> content), written with layout.json once the run is
            accepted (a refused run writes nothing).
    Returns:
        the training summary (also written to summary.json), with the peak memory of the process.
    """
    if model_cfg.condition != "none":
        raise ValueError("an RPG trained on a checkpoint collection is unconditional: set rpg.condition to 'none'")
    if len(state_dicts) < 1:
        raise ValueError("the collection is empty")
    check_collection(state_dicts, names)
    out_dir = Path(out_dir)
    tokenizer = Tokenizer.fit(state_dicts, model_cfg.token_size)
    tokens = torch.stack([tokenizer.tokenize(sd) for sd in state_dicts])  # (K, N, L)
    validate = (make_score_validator(tokenizer, diffusion_cfg, score_fn, train_cfg.val_samples, seed=seed + 17,
                                     amp=train_cfg.amp)
                if score_fn is not None else None)
    with run_lock(out_dir, callees_share=True):  # nothing is written into a folder another run holds
        summary = train_rpg(model_cfg, diffusion_cfg, train_cfg, tokenizer, tokens, out_dir, seed=seed,
                            device=device, validate=validate, tracker=tracker, progress=progress,
                            stop_after=stop_after, force=force,
                            files={"layout.json": tokenizer.layout(), **(files or {})})
        summary = {**summary, "peak_rss_mb": peak_rss_mb()}
        if summary["finished"]:
            write_json_atomic(out_dir / "summary.json", summary)
    return summary


def generate_from_checkpoint(rpg_path: str | Path, n_samples: int, *, seed: int = 0, sampler: str | None = None,
                             steps: int | None = None, mode: str = GenerateConfig.mode,
                             tokens_per_call: int = GenerateConfig.tokens_per_call,
                             device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """Load an unconditional generator and sample `n_samples` state dicts (sampler / steps default to its own)."""
    model, tokenizer, diffusion_cfg, _ = load_rpg(rpg_path, device)
    if model.cfg.condition != "none":
        raise ValueError(f"{rpg_path} is task-conditioned: generate with a task embedding (rpg generate --embedding)")
    overrides = {k: v for k, v in (("sampler", sampler), ("sample_steps", steps)) if v is not None}
    diffusion_cfg = dataclasses.replace(diffusion_cfg, **overrides)
    return sample_models(model, tokenizer, diffusion_cfg, n_samples, seed=seed, mode=mode,
                         tokens_per_call=tokens_per_call)
