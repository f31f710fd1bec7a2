"""RPG checkpoints: safetensors holding the generator weights plus, as metadata, the model/diffusion config and
the tokenizer layout (statistics included), so a file alone rebuilds a working generator. Optimizer and RNG state
for resuming live beside it in `<name>.opt.pt` (loaded with `weights_only=True`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from rpg.config import DiffusionConfig, ModelConfig
from rpg.model import RPG
from rpg.tokenize import Tokenizer
from rpg.utils import (CheckpointError, atomic_path, check_finite, load_safetensors, save_safetensors_atomic,
                       state_dict_mismatch)

FORMAT = "rpg-generator/1"


def save_rpg(path: str | Path, model: RPG, tokenizer: Tokenizer, diffusion_cfg: DiffusionConfig, *, step: int,
             extra: dict[str, Any] | None = None) -> None:
    """Write the generator atomically (weights + config + layout as metadata)."""
    state = {k: v for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "model_config": dataclasses.asdict(model.cfg),
        "diffusion_config": dataclasses.asdict(diffusion_cfg),
        "layout": tokenizer.layout(),
        "n_permutation_states": model.n_permutation_states,
        "step": step,
        "extra": extra or {},
    }
    save_safetensors_atomic(state, path, meta)


def load_rpg(path: str | Path, device: str | torch.device = "cpu") -> tuple[RPG, Tokenizer, DiffusionConfig, dict]:
    """Rebuild a generator from its file. Raises CheckpointError for files that are not RPG checkpoints."""
    tensors, meta = load_safetensors(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an RPG generator checkpoint (format {meta.get('format')!r})")
    try:
        mcfg = meta["model_config"]
        model_cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in mcfg.items()})
        diffusion_cfg = DiffusionConfig(**meta["diffusion_config"])
        tokenizer = Tokenizer.from_layout(meta["layout"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: metadata is incomplete or from another version: {err}") from err
    model = RPG(model_cfg, tokenizer.layer_index, tokenizer.token_index, int(meta["n_permutation_states"]))
    mismatch = state_dict_mismatch(model.state_dict(), tensors)
    if mismatch:
        raise CheckpointError(f"{path}: weights do not match the stored config: {mismatch}")
    # A diverged or corrupted generator would write all-NaN models that still "score"; refuse it here.
    check_finite(tensors, f"generator {path}")
    model.load_state_dict(tensors, strict=True)
    return model.to(device), tokenizer, diffusion_cfg, meta


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read training state {path}: {err}") from err
