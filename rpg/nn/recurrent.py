"""Sequence models that turn the token inputs into one prototype per token.

All map (B, N, D) -> (B, N, D) and are causal along the token sequence (except "none", which sees each token
alone). None of them is auto-regressive over generated values: noise enters only in the diffusion part.

- mamba: stacked Mamba2 layers (mamba_ssm kernels on CUDA when importable, pure PyTorch otherwise), pre-norm
  residual blocks as in mamba_ssm's `Block`.
- lstm: a stacked LSTM.
- transformer: a causal Transformer (decoder-only, masked self-attention).
- none: a per-token MLP; the paper's ablation shows this fails because tokens cannot share information.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rpg.nn.mamba import Mamba2

RECURRENT_KINDS = ("mamba", "lstm", "transformer", "none")


class MambaStack(nn.Module):
    """Pre-norm residual Mamba2 blocks.

    Activation checkpointing (`torch.utils.checkpoint`, training only; the outputs and gradients are the same, only
    recomputed): the recurrent stack runs over every token of a step's checkpoints, so its activations (~100 KB per
    token at d_model 256 in the pure-PyTorch Mamba2) are what grows with the size of the generated model; the
    denoiser sees only the diffusion batch.

    * `checkpoint_activations` alone ("layer"): each block over the whole sequence is recomputed in the backward
      pass, so only each block's input is kept. The block being recomputed still holds its activations for all
      tokens: this removes the other layers' share, not the growth with the number of tokens.
    * with `checkpoint_tokens` = T as well ("segment"): the sequence runs through the whole stack T tokens at a time,
      each segment handing its conv and SSM states to the next (`Mamba2.forward_with_state`), and each segment is
      recomputed on its own in the backward pass. Kept for the backward pass: the segment inputs and the small
      states; the activations held at once are one segment's, whatever the number of tokens. Uses the PyTorch
      Mamba2 path (the fused CUDA kernel takes no incoming state).
    """

    def __init__(self, d_model: int, n_layers: int, d_state: int, d_conv: int, expand: int, headdim: int,
                 checkpoint_activations: bool = False, checkpoint_tokens: int | None = None):
        super().__init__()
        if checkpoint_tokens is not None and checkpoint_tokens < 1:
            raise ValueError(f"checkpoint_tokens must be a positive number of tokens or None, got {checkpoint_tokens}")
        self.checkpoint_activations = checkpoint_activations
        self.checkpoint_tokens = checkpoint_tokens
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.layers = nn.ModuleList(
            Mamba2(d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, layer_idx=i)
            for i in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        if recompute and self.checkpoint_tokens is not None:
            return self._forward_segments(x, self.checkpoint_tokens)
        for norm, layer in zip(self.norms, self.layers):
            if recompute:
                x = x + checkpoint(lambda y, n=norm, f=layer: f(n(y)), x, use_reentrant=False)
            else:
                x = x + layer(norm(x))  # (B, N, D)
        return self.final_norm(x)

    def _segment(self, x: torch.Tensor, *states: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """x (B, T, D) and (conv, ssm) states per layer -> (final-normed output (B, T, D), *new states)."""
        new_states: list[torch.Tensor] = []
        for i, (norm, layer) in enumerate(zip(self.norms, self.layers)):
            y, conv_state, ssm_state = layer.forward_with_state(norm(x), states[2 * i], states[2 * i + 1])
            x = x + y
            new_states += [conv_state, ssm_state]
        return (self.final_norm(x), *new_states)

    def picked_segments(self) -> bool:
        """Whether `forward_picked` keeps only the picked rows (segment checkpointing, training with gradients)."""
        return (self.checkpoint_activations and self.checkpoint_tokens is not None and self.training
                and torch.is_grad_enabled())

    def forward_picked(self, make_input: Callable[..., torch.Tensor], codes: Sequence[torch.Tensor | None],
                       n_tokens: int, picked: torch.Tensor) -> torch.Tensor:
        """Outputs at `picked` (M,) flat indices into (B, n_tokens), shape (M, D), segment by segment.

        `make_input(start, end, *codes)` builds a segment's input (B, T, D) inside the recomputed function, so the
        whole input is never held, and each segment keeps only its picked output rows; the segments after the last
        picked token are not run (the stack is causal). Same values and gradients as `forward` then indexing.
        """
        size = self.checkpoint_tokens
        rows, cols = picked // n_tokens, picked % n_tokens
        states: tuple[torch.Tensor | None, ...] = (None,) * (2 * len(self.layers))
        pieces, order = [], []
        for start in range(0, int(cols.max()) + 1, size):
            end = min(start + size, n_tokens)
            here = ((cols >= start) & (cols < end)).nonzero().squeeze(1)  # positions in `picked`
            out, *new = checkpoint(self._picked_segment, make_input, start, end, rows[here], cols[here] - start,
                                   len(codes), *codes, *states, use_reentrant=False)
            pieces.append(out)
            order.append(here)
            states = tuple(new)
        inverse = torch.empty_like(picked)
        inverse[torch.cat(order)] = torch.arange(len(picked), device=picked.device)
        return torch.cat(pieces)[inverse]

    def _picked_segment(self, make_input: Callable[..., torch.Tensor], start: int, end: int, rows: torch.Tensor,
                        cols: torch.Tensor, n_codes: int, *codes_and_states: torch.Tensor | None
                        ) -> tuple[torch.Tensor, ...]:
        out, *new = self._segment(make_input(start, end, *codes_and_states[:n_codes]), *codes_and_states[n_codes:])
        return (out[rows, cols], *new)

    def _forward_segments(self, x: torch.Tensor, size: int) -> torch.Tensor:
        states: tuple[torch.Tensor | None, ...] = (None,) * (2 * len(self.layers))
        outputs = []
        # torch.split, not slicing: its backward assembles the input gradient once, where each slice's backward
        # would allocate a zero tensor of the whole input.
        for piece in torch.split(x, size, dim=1):
            out, *new = checkpoint(self._segment, piece, *states, use_reentrant=False)
            outputs.append(out)
            states = tuple(new)
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]


class LSTMStack(nn.Module):
    def __init__(self, d_model: int, n_layers: int):
        super().__init__()
        self.lstm = nn.LSTM(d_model, d_model, num_layers=n_layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]  # (B, N, D)


class CausalTransformer(nn.Module):
    def __init__(self, d_model: int, n_layers: int, n_heads: int = 4):
        super().__init__()
        n_heads = n_heads if d_model % n_heads == 0 else 1
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=x.device, dtype=x.dtype)
        return self.final_norm(self.encoder(x, mask=mask, is_causal=True))


class PerTokenMLP(nn.Module):
    """The "no recurrence" ablation: every token is processed on its own."""

    def __init__(self, d_model: int, n_layers: int):
        super().__init__()
        blocks = []
        for _ in range(n_layers):
            blocks += [nn.Linear(d_model, d_model), nn.SiLU()]
        self.mlp = nn.Sequential(*blocks[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def build_recurrent(kind: str, d_model: int, n_layers: int, d_state: int = 32, d_conv: int = 4, expand: int = 2,
                    headdim: int = 64, checkpoint_activations: bool = False,
                    checkpoint_tokens: int | None = None) -> nn.Module:
    """Build the sequence model named `kind` (one of RECURRENT_KINDS); activation checkpointing is for mamba."""
    if kind == "mamba":
        return MambaStack(d_model, n_layers, d_state, d_conv, expand, headdim, checkpoint_activations,
                          checkpoint_tokens)
    if kind == "lstm":
        return LSTMStack(d_model, n_layers)
    if kind == "transformer":
        return CausalTransformer(d_model, n_layers)
    if kind == "none":
        return PerTokenMLP(d_model, n_layers)
    raise ValueError(f"unknown recurrent model '{kind}' (expected one of {', '.join(RECURRENT_KINDS)})")
