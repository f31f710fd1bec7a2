"""The RPG generator: position embedding (+ permutation state, + task condition) -> recurrent model -> prototypes;
a shared 1-D conv denoiser turns noise into each token, conditioned on its prototype.

The recurrent model only produces the conditioning; `rpg.diffusion.GaussianDiffusion` owns the noise.
"""

from __future__ import annotations

import torch
from torch import nn

from rpg.config import ModelConfig
from rpg.nn.conv_denoiser import ConvDenoiser
from rpg.nn.position import PositionEmbedding
from rpg.nn.recurrent import build_recurrent

class TaskEncoder(nn.Module):
    """10-bit task embedding (0/1) -> MLP -> d_model. Bits are mapped to -1/+1 first."""

    def __init__(self, condition_dim: int, d_model: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(condition_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        return self.mlp(2.0 * bits.float() - 1.0)  # (B, D)


class RPG(nn.Module):
    """Recurrent diffusion parameter generator for one token layout.

    Args:
        cfg: resolved ModelConfig.
        layer_index, token_index: (N,) positions of the tokens (from the Tokenizer).
        n_permutation_states: rows of the permutation-state table (one per training checkpoint); 0 disables it.
    Shapes:
        prototypes(perm, cond) -> (B, N, d_model); denoiser(x_t (M, L), t (M,), proto (M, d_model)) -> (M, L).
    """

    def __init__(self, cfg: ModelConfig, layer_index: torch.Tensor, token_index: torch.Tensor,
                 n_permutation_states: int = 0):
        super().__init__()
        self.cfg = cfg
        self.n_tokens = len(layer_index)
        self.position = PositionEmbedding(cfg.position, layer_index, token_index, cfg.d_model)
        self.permutation = nn.Embedding(n_permutation_states, cfg.d_model) if n_permutation_states > 0 else None
        self.task_encoder = TaskEncoder(cfg.condition_dim, cfg.d_model) if cfg.condition == "task" else None
        self.recurrent = build_recurrent(cfg.recurrent, cfg.d_model, cfg.n_layers, cfg.d_state, cfg.d_conv,
                                         cfg.expand, cfg.headdim, cfg.checkpoint_activations)
        self.denoiser = ConvDenoiser(cfg.token_size, cfg.denoiser_channels, cfg.d_model, cfg.kernel_size)
        if self.permutation is not None:
            nn.init.normal_(self.permutation.weight, std=0.02)

    @property
    def n_permutation_states(self) -> int:
        return 0 if self.permutation is None else self.permutation.num_embeddings

    def prototypes(self, batch_size: int, perm: torch.Tensor | None = None,
                   cond: torch.Tensor | None = None) -> torch.Tensor:
        """One prototype per token for each element of the batch.

        Args:
            perm: (B,) permutation-state rows (required iff the model has permutation states).
            cond: (B, condition_dim) task bits (required iff condition == "task").
        """
        x = self.position()[None].expand(batch_size, -1, -1)  # (B, N, D)
        if self.permutation is not None:
            if perm is None:
                raise ValueError("this RPG has permutation states: pass perm (B,) row indices")
            x = x + self.permutation(perm)[:, None, :]
        if self.task_encoder is not None:
            if cond is None:
                raise ValueError("this RPG is task-conditioned: pass cond (B, condition_dim)")
            x = x + self.task_encoder(cond)[:, None, :]
        return self.recurrent(x)  # (B, N, D)
