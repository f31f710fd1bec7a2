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
    """10-bit task embedding (0/1) -> Linear(condition_dim, hidden) -> SiLU -> Linear(hidden, d_model).

    Bits are mapped to -1/+1 first. `hidden` defaults to d_model; the reference code uses 1024 (its output width,
    the token size, equals d_model there).
    """

    def __init__(self, condition_dim: int, d_model: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or d_model
        self.mlp = nn.Sequential(nn.Linear(condition_dim, hidden), nn.SiLU(), nn.Linear(hidden, d_model))

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
        self.task_encoder = (TaskEncoder(cfg.condition_dim, cfg.d_model, cfg.condition_hidden)
                             if cfg.condition == "task" else None)
        # Which positions the task condition enters: all (ours by default) or a fixed gate on the last k (the
        # reference code: the last 8, so that with the recurrence running forward only the final tokens - the head
        # and final norm of a ViT - depend on the task). Not a parameter: not in the state dict.
        if cfg.condition_tokens not in ("all", "last_k"):
            raise ValueError(f"condition_tokens must be 'all' or 'last_k', got {cfg.condition_tokens!r}")
        gate = torch.ones(self.n_tokens)
        if cfg.condition_tokens == "last_k":
            gate = (torch.arange(self.n_tokens) >= self.n_tokens - cfg.condition_k).float()
        self.register_buffer("condition_gate", gate[:, None], persistent=False)  # (N, 1)
        self.recurrent = build_recurrent(cfg.recurrent, cfg.d_model, cfg.n_layers, cfg.d_state, cfg.d_conv,
                                         cfg.expand, cfg.headdim, cfg.checkpoint_activations,
                                         cfg.checkpoint_tokens)
        self.denoiser = ConvDenoiser(cfg.token_size, cfg.denoiser_channels, cfg.d_model, cfg.kernel_size)
        if self.permutation is not None:
            nn.init.normal_(self.permutation.weight, std=0.02)

    @property
    def n_permutation_states(self) -> int:
        return 0 if self.permutation is None else self.permutation.num_embeddings

    def _codes(self, perm: torch.Tensor | None, cond: torch.Tensor | None, drop: torch.Tensor | None = None
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The per-sample vectors added to every token's position: permutation state and task code, (B, D) each
        (None where the model has none). `drop` (B,) bool: those samples get the null task code (zero: no task),
        what classifier-free guidance trains (`condition_dropout`) and samples against (`guidance_scale`)."""
        perm_code = cond_code = None
        if self.permutation is not None:
            if perm is None:
                raise ValueError("this RPG has permutation states: pass perm (B,) row indices")
            perm_code = self.permutation(perm)  # (B, D)
        if self.task_encoder is not None:
            if cond is None:
                raise ValueError("this RPG is task-conditioned: pass cond (B, condition_dim)")
            cond_code = self.task_encoder(cond)  # (B, D)
            if drop is not None:
                cond_code = cond_code * (~drop.to(cond_code.device)).to(cond_code.dtype)[:, None]
        return perm_code, cond_code

    def recurrent_input(self, start: int, end: int, batch_size: int, perm_code: torch.Tensor | None,
                        cond_code: torch.Tensor | None) -> torch.Tensor:
        """The recurrent model's input for tokens start..end-1: position (+ permutation state, + gated task code).
        Shapes: codes (B, D) -> (B, end - start, D)."""
        x = self.position()[start:end][None].expand(batch_size, -1, -1)  # (B, T, D)
        if perm_code is not None:
            x = x + perm_code[:, None, :]
        if cond_code is not None:
            x = x + cond_code[:, None, :] * self.condition_gate[start:end]
        return x

    def prototypes(self, batch_size: int, perm: torch.Tensor | None = None,
                   cond: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        """One prototype per token for each element of the batch.

        Args:
            perm: (B,) permutation-state rows (required iff the model has permutation states).
            cond: (B, condition_dim) task bits (required iff condition == "task").
            drop: (B,) bool, samples whose task code is the null code (see `_codes`).
        """
        codes = self._codes(perm, cond, drop)
        return self.recurrent(self.recurrent_input(0, self.n_tokens, batch_size, *codes))  # (B, N, D)

    def prototypes_at(self, picked: torch.Tensor, batch_size: int, perm: torch.Tensor | None = None,
                      cond: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        """The prototypes of the tokens `picked` (M,), flat indices into the B * N tokens of the batch: the values
        of `prototypes(...).reshape(B * N, -1)[picked]`, shape (M, D).

        With segment checkpointing in training (`MambaStack.picked_segments`), the recurrent input and output are
        built and kept one segment of tokens at a time and only the picked rows outlive their segment, so no
        (B, N, D) tensor (nor its gradient) exists: what a training step holds then barely grows with N.
        """
        if len(picked) and getattr(self.recurrent, "picked_segments", lambda: False)():
            codes = self._codes(perm, cond, drop)
            return self.recurrent.forward_picked(
                lambda start, end, *c: self.recurrent_input(start, end, batch_size, *c), codes, self.n_tokens,
                picked)
        return self.prototypes(batch_size, perm, cond, drop).reshape(batch_size * self.n_tokens, -1)[picked]
