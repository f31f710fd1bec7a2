"""Position embeddings of parameter tokens: 2-D sinusoidal (layer, token-in-layer), 1-D, or learnable."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal(positions: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Classic sin/cos embedding of integer positions.

    Shapes: positions (N,) -> (N, dim)
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / max(half, 1))
    args = positions.double()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros(len(positions), 1, dtype=emb.dtype)], dim=-1)
    return emb.float()


def sinusoidal_2d(layer_index: torch.Tensor, token_index: torch.Tensor, dim: int) -> torch.Tensor:
    """Half of the channels encode the layer index, half the token index within the layer.

    Shapes: layer_index, token_index (N,) -> (N, dim)
    """
    half = dim // 2
    return torch.cat([sinusoidal(layer_index, half), sinusoidal(token_index, dim - half)], dim=-1)


class PositionEmbedding(nn.Module):
    """Per-token position embedding for a fixed token layout.

    Args:
        kind: "2d" (fixed, default), "1d" (fixed, global token index) or "learnable" (initialised as 2d).
        layer_index, token_index: (N,) position of each token.
        dim: embedding width (the recurrent model's d_model).
    """

    def __init__(self, kind: str, layer_index: torch.Tensor, token_index: torch.Tensor, dim: int):
        super().__init__()
        if kind == "1d":
            table = sinusoidal(torch.arange(len(layer_index)), dim)
        elif kind in ("2d", "learnable"):
            table = sinusoidal_2d(layer_index, token_index, dim)
        else:
            raise ValueError(f"unknown position embedding '{kind}' (expected 2d, 1d or learnable)")
        self.kind = kind
        if kind == "learnable":
            self.table = nn.Parameter(table)
        else:
            self.register_buffer("table", table, persistent=False)

    def forward(self) -> torch.Tensor:
        return self.table  # (N, dim)
