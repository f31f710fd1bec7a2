"""Parameter tokenization: state dicts <-> normalised, padded tokens of a fixed length.

Each generated layer (a floating tensor with more than one element) is normalised with its own mean and std
(averaged over the checkpoint collection and stored so generation can undo them), flattened and cut into tokens of
`token_size`; the last token of a layer is zero-padded and a mask marks the real positions. Non-float entries and
scalars (e.g. BatchNorm `num_batches_tracked`) are copied from the first checkpoint, never generated.

BatchNorm `running_var` is positive and skewed, so (as in the reference code) it is generated in the log domain:
``y = log(var / (0.95 * mean_var) + 0.05)``, inverted as ``(exp(y) - 0.05) * 0.95 * mean_var`` and clipped at a
small positive floor.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch

from rpg.utils import CheckpointError

VAR_FLOOR = 1e-6


@dataclass(frozen=True)
class LayerSpec:
    """How one state-dict entry maps to tokens."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    n_tokens: int
    offset: int  # index of the layer's first token in the sequence
    transform: str  # "none" | "log_var"
    mean: float
    std: float
    var_scale: float = 1.0  # 0.95 * mean running_var, for transform == "log_var"


def _is_generated(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and tensor.numel() > 1


def _is_running_var(name: str) -> bool:
    return name.endswith("running_var")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_collection(state_dicts: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str] | None = None) -> None:
    """Raise CheckpointError when the collection disagrees on keys/shapes or holds NaN/Inf weights.

    Args:
        state_dicts: the checkpoints.
        names: labels of the checkpoints (file names) for the error messages.
    """
    if not state_dicts:
        raise CheckpointError("the checkpoint collection is empty")
    names = list(names) if names is not None else [f"checkpoint #{i}" for i in range(len(state_dicts))]
    ref = state_dicts[0]
    for sd, label in zip(state_dicts, names):
        missing, extra = set(ref) - set(sd), set(sd) - set(ref)
        if missing or extra:
            raise CheckpointError(
                f"{label}: keys disagree with {names[0]}: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
            )
        for key, tensor in sd.items():
            if tuple(tensor.shape) != tuple(ref[key].shape):
                raise CheckpointError(
                    f"{label}: '{key}' has shape {tuple(tensor.shape)} but {names[0]} has {tuple(ref[key].shape)}"
                )
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(f"{label}: '{key}' holds NaN or Inf values")


class Tokenizer:
    """Maps state dicts of one architecture to token sequences and back.

    Shapes:
        tokens: (n_tokens, token_size); mask: (n_tokens, token_size) bool;
        layer_index / token_index: (n_tokens,) long (position of each token: which layer, which token within it).
    """

    def __init__(self, token_size: int, layers: list[LayerSpec], copied: dict[str, torch.Tensor]):
        self.token_size = token_size
        self.layers = layers
        self.copied = copied
        self.n_tokens = sum(layer.n_tokens for layer in layers)
        mask = torch.zeros(self.n_tokens, token_size, dtype=torch.bool)
        layer_index = torch.empty(self.n_tokens, dtype=torch.long)
        token_index = torch.empty(self.n_tokens, dtype=torch.long)
        for i, layer in enumerate(layers):
            rows = slice(layer.offset, layer.offset + layer.n_tokens)
            flat = torch.zeros(layer.n_tokens * token_size, dtype=torch.bool)
            flat[: layer.numel] = True
            mask[rows] = flat.view(layer.n_tokens, token_size)
            layer_index[rows] = i
            token_index[rows] = torch.arange(layer.n_tokens)
        self.mask, self.layer_index, self.token_index = mask, layer_index, token_index

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, state_dicts: Sequence[Mapping[str, torch.Tensor]], token_size: int) -> "Tokenizer":
        """Compute per-layer statistics over a collection (validated first) and build the layout."""
        check_collection(state_dicts)
        ref = state_dicts[0]
        layers: list[LayerSpec] = []
        copied: dict[str, torch.Tensor] = {}
        offset = 0
        for name, tensor in ref.items():
            if not _is_generated(tensor):
                copied[name] = tensor.detach().clone()
                continue
            transform, var_scale = "none", 1.0
            stack = torch.stack([sd[name].detach().double().flatten() for sd in state_dicts])  # (K, numel)
            if _is_running_var(name):
                transform = "log_var"
                var_scale = 0.95 * stack.clamp_min(VAR_FLOOR).mean().item()
                stack = torch.log(stack.clamp_min(VAR_FLOOR) / var_scale + 0.05)
            mean = stack.mean(dim=1).mean().item()
            std = stack.std(dim=1, unbiased=False).mean().item() if stack.shape[1] > 1 else 0.0
            std = std if std > 1e-12 else 1.0  # constant layers (e.g. LayerNorm init) stay constant
            n_tokens = math.ceil(tensor.numel() / token_size)
            layers.append(
                LayerSpec(name, tuple(tensor.shape), _dtype_name(tensor.dtype), tensor.numel(), n_tokens, offset,
                          transform, mean, std, var_scale)
            )
            offset += n_tokens
        if not layers:
            raise CheckpointError("no floating-point tensors with more than one element to generate")
        return cls(token_size, layers, copied)

    # ------------------------------------------------------------------------------------------------------------
    def tokenize(self, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """State dict -> normalised tokens (n_tokens, token_size); padding is zero."""
        out = torch.zeros(self.n_tokens, self.token_size, dtype=torch.float64)
        for layer in self.layers:
            if layer.name not in state_dict:
                raise CheckpointError(f"state dict lacks '{layer.name}'")
            values = state_dict[layer.name].detach().to(torch.float64).flatten()
            if values.numel() != layer.numel:
                raise CheckpointError(f"'{layer.name}' has {values.numel()} elements, layout expects {layer.numel}")
            if layer.transform == "log_var":
                values = torch.log(values.clamp_min(VAR_FLOOR) / layer.var_scale + 0.05)
            values = (values - layer.mean) / layer.std
            flat = out[layer.offset : layer.offset + layer.n_tokens].view(-1)
            flat[: layer.numel] = values
        return out.to(dtype)

    def detokenize(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tokens (n_tokens, token_size) -> state dict in the original dtypes; padding is dropped."""
        if tuple(tokens.shape) != (self.n_tokens, self.token_size):
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}, expected {(self.n_tokens, self.token_size)}")
        tokens = tokens.detach().to("cpu", torch.float64)
        state: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            values = self.layer_values(tokens, layer) * layer.std + layer.mean
            if layer.transform == "log_var":
                values = ((torch.exp(values) - 0.05) * layer.var_scale).clamp_min(VAR_FLOOR)
            state[layer.name] = values.view(layer.shape).to(getattr(torch, layer.dtype))
        for name, tensor in self.copied.items():
            state[name] = tensor.clone()
        return state

    @staticmethod
    def layer_values(tokens: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
        """The layer's normalised values (layer.numel,) out of tokens (n_tokens, token_size), padding dropped."""
        return tokens[layer.offset : layer.offset + layer.n_tokens].reshape(-1)[: layer.numel]

    # ------------------------------------------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def layout(self) -> dict:
        """JSON-serialisable description (statistics included) of the token <-> parameter mapping."""
        return {
            "token_size": self.token_size,
            "n_tokens": self.n_tokens,
            "n_params": self.n_params,
            "layers": [asdict(layer) for layer in self.layers],
            "copied": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype), "values": v.flatten().tolist()}
                       for k, v in self.copied.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.layout())

    @classmethod
    def from_layout(cls, layout: Mapping) -> "Tokenizer":
        layers = [LayerSpec(**{**spec, "shape": tuple(spec["shape"])}) for spec in layout["layers"]]
        copied = {
            k: torch.tensor(v["values"], dtype=getattr(torch, v["dtype"])).view(v["shape"])
            for k, v in layout["copied"].items()
        }
        return cls(int(layout["token_size"]), layers, copied)

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        return cls.from_layout(json.loads(text))
