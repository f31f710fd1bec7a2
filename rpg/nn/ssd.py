"""Structured state-space duality (SSD) scan of Mamba2 in pure PyTorch.

The recurrence, per batch element and head (groups of heads share B and C)::

    h_t = exp(A * dt_t) * h_{t-1} + B_t (x_t * dt_t)^T      # state (p, n)
    y_t = h_t C_t                                           # output (p,)

``ssd_chunked`` evaluates it without a Python loop over time, following the "minimal discrete SSD"
algorithm of the Mamba2 paper (Dao & Gu, 2024, listing 1): the sequence is cut into chunks; inside a
chunk the recurrence is a masked, decay-weighted attention (quadratic in the chunk length), and between
chunks only the (p, n) states are carried, which is again a small decay-weighted sum. This is the
fallback for machines without the Triton kernels of ``mamba_ssm``; ``ssd_naive`` is the plain
step-by-step loop that tests and benchmarks compare it with.

Both work in float32 (float64 if the inputs are float64) whatever the input dtype, as the CUDA kernels do:
the decays are exponentials of cumulative sums, which lose too much precision in half precision.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

__all__ = ["ssd_chunked", "ssd_naive", "segsum"]

Output = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # float64 stays float64 (tests compare to 1e-9); everything else is upcast to float32.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_shapes(x, dt, A, B, C, initial_states) -> Tuple[int, int, int, int, int, int]:
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, length, nheads, headdim), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if B.dim() != 4 or B.shape != C.shape or B.shape[:2] != (b, l):
        raise ValueError(f"B and C must both be (batch, length, ngroups, d_state) = ({b}, {l}, g, n); "
                         f"got {tuple(B.shape)} and {tuple(C.shape)}")
    g, n = B.shape[2], B.shape[3]
    if h % g != 0:
        raise ValueError(f"nheads ({h}) must be a multiple of ngroups ({g})")
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be (batch, length, nheads) = {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be (nheads,) = ({h},), got {tuple(A.shape)}")
    if initial_states is not None and initial_states.shape != (b, h, p, n):
        raise ValueError(f"initial_states must be (batch, nheads, headdim, d_state) = {(b, h, p, n)}, "
                         f"got {tuple(initial_states.shape)}")
    return b, l, h, p, g, n


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Segment sums ``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for ``i >= j``, ``-inf`` above the diagonal.

    ``exp(segsum(a))`` is the lower-triangular matrix of decays from step j to step i. It is built by a masked
    cumulative sum rather than as ``cumsum[i] - cumsum[j]``: the difference of two large cumulative sums loses
    precision in float32 exactly where the decay is close to one, i.e. where it matters.

    Shapes:
        a: (..., T) -> (..., T, T)
    """
    t = a.shape[-1]
    a = repeat(a, "... i -> ... i j", j=t)  # (..., T, T), a[..., i, j] = a_i
    strictly_lower = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~strictly_lower, 0.0)
    out = torch.cumsum(a, dim=-2)  # out[i, j] = sum_{j < k <= i} a_k
    lower = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~lower, float("-inf"))


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 256,
    initial_states: Optional[torch.Tensor] = None,
    return_final_state: bool = False,
) -> Output:
    """Chunked SSD scan (no loop over time).

    Args:
        x: inputs per head.
        dt: step sizes, already biased, softplus'ed and clamped (positive).
        A: per-head decay rates (negative); the step decay is ``exp(A * dt)``.
        B: input projections, one per group; group ``g`` serves heads ``g * h/g ... (g+1) * h/g - 1``.
        C: output projections, grouped like B.
        chunk_size: chunk length; the cost is O(L * chunk_size) inside chunks plus O((L / chunk_size)^2)
            across them. L need not be a multiple of it (the tail is zero-padded).
        initial_states: state before the first step (zeros if None).
        return_final_state: also return the state after the last step.

    Shapes:
        x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n); initial_states: (b, h, p, n)
        returns y: (b, l, h, p) in x's dtype, and if asked final_state: (b, h, p, n) in float32/float64.
    """
    b, seqlen, h, p, g, n = _check_shapes(x, dt, A, B, C, initial_states)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out_dtype, cd = x.dtype, _compute_dtype(x)
    if seqlen == 0:  # nothing to scan: the state passes through unchanged
        state = torch.zeros(b, h, p, n, dtype=cd, device=x.device) if initial_states is None else initial_states.to(cd)
        return (x.clone(), state) if return_final_state else x.clone()
    x, dt, A, B, C = (t.to(cd) for t in (x, dt, A, B, C))
    chunk_size = min(chunk_size, seqlen)  # a chunk longer than the sequence would only add zero padding

    # Zero padding to a whole number of chunks: dt = 0 there means decay exp(0) = 1 and input x*dt = 0,
    # so padded steps leave the state untouched and the final state is still the state after step L-1.
    pad = (-seqlen) % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))

    # Heads are split as (g r): group g, head r within the group. Keeping B and C per group (instead of
    # repeating them over heads) computes C.B^T once per group.
    X = x * dt.unsqueeze(-1)  # (b, L, h, p): the discretised input x*dt
    X = rearrange(X, "b (c s) (g r) p -> b c s g r p", s=chunk_size, g=g)
    Adt = rearrange(dt * A, "b (c s) (g r) -> b c g r s", s=chunk_size, g=g)
    B = rearrange(B, "b (c s) g n -> b c s g n", s=chunk_size)
    C = rearrange(C, "b (c s) g n -> b c s g n", s=chunk_size)
    A_cumsum = torch.cumsum(Adt, dim=-1)  # (b, c, g, r, s): log decay from chunk start to each step

    # 1. Within each chunk: y_i = sum_{j <= i} (C_i . B_j) exp(A_{j+1} + ... + A_i) X_j, a masked "attention".
    decay = torch.exp(segsum(Adt))  # (b, c, g, r, l, s)
    CB = torch.einsum("bclgn,bcsgn->bcgls", C, B)  # (b, c, g, l, s)
    y_diag = torch.einsum("bcgrls,bcsgrp->bclgrp", CB.unsqueeze(3) * decay, X)  # (b, c, l, g, r, p)

    # 2. State at the end of each chunk, from that chunk's inputs alone. The decay from step s to the chunk's
    # last step is the last row of the within-chunk decay matrix.
    decay_to_end = rearrange(decay[..., -1, :], "b c g r s -> b c s g r 1")
    states = torch.einsum("bcsgn,bcsgrp->bcgrpn", B, X * decay_to_end)  # (b, c, g, r, p, n)

    # 3. Across chunks: the true state entering chunk k is sum_{k' < k} decay(k' -> k) * states[k'] (plus the
    # initial state), the same segment-sum trick applied to each chunk's total log decay.
    if initial_states is None:
        init = torch.zeros_like(states[:, :1])  # (b, 1, g, r, p, n)
    else:
        init = rearrange(initial_states.to(cd), "b (g r) p n -> b 1 g r p n", g=g)
    states = torch.cat([init, states], dim=1)  # (b, c+1, g, r, p, n)
    chunk_totals = rearrange(A_cumsum[..., -1], "b c g r -> b g r c")  # log decay across each whole chunk
    chunk_decay = torch.exp(segsum(F.pad(chunk_totals, (1, 0))))  # (b, g, r, c+1, c+1); index 0 = initial
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay, states)  # (b, c+1, g, r, p, n)
    states_in, final_state = states[:, :-1], states[:, -1]  # (b, c, g, r, p, n), (b, g, r, p, n)

    # 4. Contribution of the incoming state: C_i . state, decayed from the chunk start to step i.
    decay_from_start = rearrange(torch.exp(A_cumsum), "b c g r l -> b c l g r 1")
    y_off = torch.einsum("bclgn,bcgrpn->bclgrp", C, states_in) * decay_from_start  # (b, c, l, g, r, p)

    y = rearrange(y_diag + y_off, "b c l g r p -> b (c l) (g r) p")[:, :seqlen]  # (b, l, h, p)
    y = y.to(out_dtype)
    if return_final_state:
        return y, rearrange(final_state, "b g r p n -> b (g r) p n")
    return y


def ssd_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 256,
    initial_states: Optional[torch.Tensor] = None,
    return_final_state: bool = False,
) -> Output:
    """Reference SSD scan: a plain loop over time steps.

    Same arguments, shapes and return values as ``ssd_chunked``; ``chunk_size`` is accepted for a
    drop-in signature and ignored. O(L) sequential steps, so only for tests and benchmarks.
    """
    b, seqlen, h, p, g, n = _check_shapes(x, dt, A, B, C, initial_states)
    out_dtype, cd = x.dtype, _compute_dtype(x)
    x, dt, A, B, C = (t.to(cd) for t in (x, dt, A, B, C))
    B = repeat(B, "b l g n -> b l (g r) n", r=h // g)  # (b, l, h, n)
    C = repeat(C, "b l g n -> b l (g r) n", r=h // g)  # (b, l, h, n)
    state = (torch.zeros(b, h, p, n, dtype=cd, device=x.device) if initial_states is None
             else initial_states.to(cd))  # (b, h, p, n)
    ys = []
    for t in range(seqlen):
        dA = torch.exp(A * dt[:, t])  # (b, h)
        dBx = torch.einsum("bhn,bhp->bhpn", B[:, t], x[:, t] * dt[:, t, :, None])  # (b, h, p, n)
        state = state * dA[..., None, None] + dBx
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))  # (b, h, p)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p)  # (b, l, h, p)
    y = y.to(out_dtype)
    if return_final_state:
        return y, state
    return y
