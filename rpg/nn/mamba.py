"""Mamba2 layer that runs everywhere, with the parameters of ``mamba_ssm.Mamba2`` (mamba-ssm v2.x).

``mamba_ssm`` cannot even be imported without its compiled CUDA extension, and its scan exists only as
Triton kernels. This module keeps the same parameter names, shapes and initialisation (see STYLE.md §3), so
a state dict moves between the two with ``strict=True``, and it picks its implementation per call:

* the tensors are on CUDA and ``mamba_ssm`` imports -> the fused kernel ``mamba_split_conv1d_scan_combined``
  called with this module's own parameters, exactly as ``mamba_ssm.Mamba2.forward`` does;
* otherwise -> plain PyTorch: ``nn.Conv1d`` for the causal conv and the chunked SSD of ``rpg.nn.ssd``.

Reference: Dao & Gu, "Transformers are SSMs" (2024); https://github.com/state-spaces/mamba
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from rpg.nn.ssd import ssd_chunked

# Optional CUDA/Triton kernels. Any `import mamba_ssm...` runs `import selective_scan_cuda` (releases up to
# v2.3.2.post1), and the Triton files import `triton`: both fail on CPU-only installs, sometimes as OSError
# (a shared library that doesn't load) rather than ImportError.
try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
    _IMPORT_ERROR: Optional[BaseException] = None
except (ImportError, OSError) as err:  # pragma: no cover - depends on the machine
    mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined = None, None
    _IMPORT_ERROR = err

MAMBA_SSM_AVAILABLE: bool = mamba_split_conv1d_scan_combined is not None
BACKENDS = ("auto", "torch", "cuda")

__all__ = ["Mamba2", "RMSNormGated", "create_mamba2", "MAMBA_SSM_AVAILABLE", "BACKENDS"]


class RMSNormGated(nn.Module):
    """Group-wise RMSNorm with a SiLU gate, parameter-compatible with ``mamba_ssm``'s gated ``RMSNorm``.

    ``norm_before_gate=False`` (Mamba2's default) computes ``rmsnorm(x * silu(z)) * weight``; ``True`` computes
    ``rmsnorm(x) * weight * silu(z)``. The mean square is taken over groups of ``group_size`` channels, so each
    B/C group of heads is normalised on its own. Computed in float32 (float64 for float64 inputs).

    Shapes:
        x, z: (..., hidden_size) -> (..., hidden_size), in x's dtype
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 norm_before_gate: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = hidden_size if group_size is None else group_size
        if hidden_size % self.group_size != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of group_size ({self.group_size})")
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)  # mamba_ssm's norm has no bias either: no key in the state dict

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        dtype, cd = x.dtype, (torch.float64 if x.dtype == torch.float64 else torch.float32)
        x = x.to(cd)
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z.to(cd))
        xg = rearrange(x, "... (g d) -> ... g d", d=self.group_size)
        xg = xg * torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + self.eps)
        out = rearrange(xg, "... g d -> ... (g d)") * self.weight.to(cd)
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.to(cd))
        return out.to(dtype)


class Mamba2(nn.Module):
    """Mamba2 mixer, a drop-in for ``mamba_ssm.modules.mamba2.Mamba2`` (same kwargs, defaults, state dict).

    Args:
        d_model: model width D.
        d_state, d_conv, expand, headdim, d_ssm, ngroups: sizes as in mamba_ssm. d_inner = expand * d_model;
            the SSM runs on d_ssm (default d_inner) channels in nheads = d_ssm / headdim heads, and the other
            d_inner - d_ssm channels go through a SiLU-gated MLP branch.
        A_init_range, dt_min, dt_max, dt_init_floor, conv_init: initialisation (A ~ U[A_init_range],
            dt log-uniform in [dt_min, dt_max], conv weights U[-conv_init, conv_init] if given).
        D_has_hdim: one skip weight D per channel instead of per head.
        rmsnorm, norm_before_gate: gated RMSNorm on the SSM output (else a plain SiLU(z) gate).
        dt_limit: clamp of dt after softplus; (0, inf) means no clamp.
        bias, conv_bias: biases of in_proj/out_proj and of the conv.
        chunk_size: SSD chunk length (both the kernel and the PyTorch path).
        use_mem_eff_path: on CUDA, use the fused conv+scan+norm+out_proj kernel.
        layer_idx: absorbed, as in mamba_ssm. process_group/sequence_parallel: only the single-device
            defaults are supported.
        backend: "auto" (CUDA kernels when the input is on CUDA and mamba_ssm imports, else PyTorch),
            "torch" (always PyTorch), "cuda" (always the kernels; RuntimeError if they are missing).
            It is a plain attribute, so ``module.backend = "torch"`` switches an existing module.

    Shapes:
        forward: u (B, L, D) -> (B, L, D)
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: Optional[float] = None,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: Optional[int] = None,
        ngroups: int = 1,
        A_init_range: Tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: Tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        use_mem_eff_path: bool = True,
        layer_idx: Optional[int] = None,
        process_group=None,
        sequence_parallel: bool = True,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if process_group is not None:
            raise NotImplementedError("rpg.nn.Mamba2 has no tensor parallelism; use mamba_ssm.Mamba2 for that")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.conv_init = conv_init
        self.d_inner = expand * d_model
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        self.ngroups = ngroups
        if self.d_ssm > self.d_inner or self.d_ssm % headdim != 0:
            raise ValueError(f"d_ssm ({self.d_ssm}) must be <= d_inner ({self.d_inner}) and a multiple of "
                             f"headdim ({headdim})")
        self.nheads = self.d_ssm // headdim
        if self.nheads % ngroups != 0:
            raise ValueError(f"nheads ({self.nheads}) must be a multiple of ngroups ({ngroups})")
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.activation = "silu"
        self.chunk_size, self.use_mem_eff_path, self.layer_idx = chunk_size, use_mem_eff_path, layer_idx
        self.backend = backend
        self._check_backend()

        # Parameters are created in mamba_ssm's order, so the same seed on the same device gives the same init.
        # in_proj output order: [z0, x0 (MLP branch, d_inner - d_ssm each), z, x, B, C, dt].
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **factory_kwargs)
        conv_dim = self.d_ssm + 2 * ngroups * d_state
        # Depthwise and causal: padding d_conv-1 on both sides, the first L outputs are kept in forward().
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, bias=conv_bias,
                                padding=d_conv - 1, **factory_kwargs)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

        # dt ~ log-uniform in [dt_min, dt_max]; dt_bias is its inverse softplus, so softplus(dt_bias) = dt when
        # the projected dt is zero.
        dt = torch.exp(torch.rand(self.nheads, **factory_kwargs) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.dt_bias._no_weight_decay = True

        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))  # A = -exp(A_log) < 0 keeps the scan stable
        self.A_log._no_weight_decay = True
        # Like mamba_ssm, D is created in float32 whatever `dtype` is.
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True

        if rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, norm_before_gate=norm_before_gate,
                                     group_size=self.d_ssm // ngroups, **factory_kwargs)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory_kwargs)

    # ------------------------------------------------------------------ dispatch

    def _check_backend(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "cuda" and not MAMBA_SSM_AVAILABLE:
            raise RuntimeError(
                "Mamba2(backend='cuda') needs the mamba_ssm CUDA/Triton kernels, which failed to import "
                f"({_IMPORT_ERROR!r}). Install them on a GPU machine with "
                "`pip install --no-build-isolation '.[cuda]'`, or use backend='auto' or 'torch'.")

    def _use_kernels(self, u: torch.Tensor) -> bool:
        self._check_backend()
        if self.backend == "torch":
            return False
        if self.backend == "cuda":
            if not u.is_cuda:
                raise RuntimeError(f"Mamba2(backend='cuda') got a tensor on {u.device}; the kernels need CUDA")
            return True
        return u.is_cuda and MAMBA_SSM_AVAILABLE

    def _D(self) -> torch.Tensor:
        # The kernels take D as (nheads, headdim) when it has one weight per channel, else (nheads,).
        return rearrange(self.D, "(h p) -> h p", p=self.headdim) if self.D_has_hdim else self.D

    def _dt_limit_kwargs(self) -> dict:
        # Like mamba_ssm: only pass dt_limit when it is not the no-op default (the kernels skip the clamp).
        return {} if self.dt_limit == (0.0, float("inf")) else {"dt_limit": self.dt_limit}

    # ------------------------------------------------------------------ forward

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Args: u: (B, L, d_model). Returns: (B, L, d_model)."""
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"expected input (batch, length, {self.d_model}), got {tuple(u.shape)}")
        use_kernels = self._use_kernels(u)
        zxbcdt = self.in_proj(u)  # (B, L, d_in_proj)
        if use_kernels and self.use_mem_eff_path:
            return self._forward_fused(zxbcdt)
        return self._forward_unfused(zxbcdt, triton_scan=use_kernels)

    def _forward_fused(self, zxbcdt: torch.Tensor) -> torch.Tensor:
        """mamba_ssm's use_mem_eff_path branch: conv, scan, gated norm and out_proj in one kernel call."""
        A = -torch.exp(self.A_log.float())  # (nheads,); float32 so that fp16 A_log can't overflow to -inf
        return mamba_split_conv1d_scan_combined(
            zxbcdt,
            rearrange(self.conv1d.weight, "d 1 w -> d w"),
            self.conv1d.bias,
            self.dt_bias,
            A,
            D=self._D(),
            chunk_size=self.chunk_size,
            seq_idx=None,
            activation=self.activation,
            rmsnorm_weight=self.norm.weight if self.rmsnorm else None,
            rmsnorm_eps=self.norm.eps if self.rmsnorm else 1e-6,
            outproj_weight=self.out_proj.weight,
            outproj_bias=self.out_proj.bias,
            headdim=None if self.D_has_hdim else self.headdim,
            ngroups=self.ngroups,
            norm_before_gate=self.norm_before_gate,
            **self._dt_limit_kwargs(),
        )

    def _forward_unfused(self, zxbcdt: torch.Tensor, triton_scan: bool = False) -> torch.Tensor:
        """Step by step: causal conv, SSD scan (PyTorch, or mamba_ssm's Triton scan), gate/norm, out_proj."""
        batch, seqlen, _ = zxbcdt.shape
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        d_mlp = (zxbcdt.shape[-1] - 2 * self.d_ssm - 2 * g * n - h) // 2
        z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.d_ssm + 2 * g * n, h], dim=-1)

        # Causal depthwise conv. Keep the first L outputs: mamba_ssm's own fallback trims [:, :-(d_conv-1)],
        # which is empty for d_conv=1.
        xBC = self.conv1d(rearrange(xBC, "b l d -> b d l"))[..., :seqlen]  # (B, conv_dim, L)
        xBC = F.silu(rearrange(xBC, "b d l -> b l d"))  # (B, L, d_ssm + 2 g n)
        x, B, C = torch.split(xBC, [self.d_ssm, g * n, g * n], dim=-1)
        x = rearrange(x, "b l (h p) -> b l h p", p=p)  # (B, L, H, P)
        B = rearrange(B, "b l (g n) -> b l g n", g=g)  # (B, L, G, N)
        C = rearrange(C, "b l (g n) -> b l g n", g=g)  # (B, L, G, N)

        if triton_scan:
            y = mamba_chunk_scan_combined(
                x, dt, -torch.exp(self.A_log.float()), B, C, chunk_size=self.chunk_size, D=self._D(),
                z=None if self.rmsnorm else rearrange(z, "b l (h p) -> b l h p", p=p),
                dt_bias=self.dt_bias, dt_softplus=True, **self._dt_limit_kwargs())  # (B, L, H, P)
            y = rearrange(y, "b l h p -> b l (h p)")
        else:
            x, dt, A = self._scan_inputs(x, dt, zxbcdt.dtype)
            y = ssd_chunked(x, dt, A, B, C, chunk_size=self.chunk_size)  # (B, L, H, P)
            y = self._skip_and_gate(y, x, z)
        return self._output(y, z, z0, x0, d_mlp, zxbcdt.dtype)

    def _scan_inputs(self, x: torch.Tensor, dt: torch.Tensor, dtype: torch.dtype,
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, dt (softplus + bias, clamped) and A for the PyTorch scan. Like the kernels, dt, A, the scan, D and the
        gate run in float32 (float64 stays float64). Shapes: x (B, L, H, P), dt (B, L, H) -> the same, A (H,)."""
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        dt = F.softplus(dt.to(cd) + self.dt_bias.to(cd))
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(min=self.dt_limit[0], max=self.dt_limit[1])
        return x.to(cd), dt, -torch.exp(self.A_log.to(cd))

    def _skip_and_gate(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The skip connection D * x and (without the gated RMSNorm) the SiLU gate, in the scan's dtype.
        Shapes: y, x (B, L, H, P), z (B, L, d_ssm) -> (B, L, d_ssm)."""
        D = self._D().to(y.dtype)
        y = y + x * (D if self.D_has_hdim else rearrange(D, "h -> h 1"))
        y = rearrange(y, "b l h p -> b l (h p)")
        return y if self.rmsnorm else y * F.silu(z.to(y.dtype))

    def _output(self, y: torch.Tensor, z: torch.Tensor, z0: torch.Tensor, x0: torch.Tensor, d_mlp: int,
                dtype: torch.dtype) -> torch.Tensor:
        """Gated RMSNorm (if any), the MLP channels first (as in mamba_ssm), out_proj. -> (B, L, D)."""
        if self.rmsnorm:
            y = self.norm(y, z)
        y = y.to(dtype)
        if d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def forward_with_state(self, u: torch.Tensor, conv_state: Optional[torch.Tensor] = None,
                           ssm_state: Optional[torch.Tensor] = None,
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One segment of a longer sequence: the same outputs as ``forward`` over the whole sequence, cut anywhere.

        The state entering the segment is the last ``d_conv - 1`` conv inputs and the SSM state (zeros when None,
        i.e. the sequence starts here); both are returned for the next segment and carry gradients, so a sequence
        can be run (and recomputed under activation checkpointing) one segment at a time. Always the PyTorch path
        (conv + chunked SSD scan): the fused CUDA kernel takes no incoming state.

        Shapes:
            u (B, L, D) -> y (B, L, D), conv_state (B, conv_dim, d_conv - 1), ssm_state (B, nheads, headdim, d_state)
        """
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"expected input (batch, length, {self.d_model}), got {tuple(u.shape)}")
        zxbcdt = self.in_proj(u)  # (B, L, d_in_proj)
        batch, seqlen, _ = zxbcdt.shape
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        d_mlp = (zxbcdt.shape[-1] - 2 * self.d_ssm - 2 * g * n - h) // 2
        z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.d_ssm + 2 * g * n, h], dim=-1)

        xBC = rearrange(xBC, "b l d -> b d l")  # (B, conv_dim, L)
        if conv_state is None:
            conv_state = xBC.new_zeros(batch, xBC.shape[1], self.d_conv - 1)
        full = torch.cat([conv_state.to(xBC.dtype), xBC], dim=-1)  # (B, conv_dim, d_conv - 1 + L)
        # The last d_conv - 1 conv inputs, copied: a view would keep the whole segment's `full` alive for as long as
        # the state lives (every segment's, under segment checkpointing: ~4 KB per token of a training step).
        new_conv_state = full[..., full.shape[-1] - (self.d_conv - 1):].clone(memory_format=torch.contiguous_format)
        xBC = F.conv1d(full, self.conv1d.weight, self.conv1d.bias, groups=self.conv1d.groups)  # (B, conv_dim, L)
        xBC = F.silu(rearrange(xBC, "b d l -> b l d"))
        x, B, C = torch.split(xBC, [self.d_ssm, g * n, g * n], dim=-1)
        x = rearrange(x, "b l (h p) -> b l h p", p=p)
        B = rearrange(B, "b l (g n) -> b l g n", g=g)
        C = rearrange(C, "b l (g n) -> b l g n", g=g)

        x, dt, A = self._scan_inputs(x, dt, zxbcdt.dtype)
        y, new_ssm_state = ssd_chunked(x, dt, A, B, C, chunk_size=self.chunk_size, initial_states=ssm_state,
                                       return_final_state=True)  # (B, L, H, P), (B, H, P, N)
        new_ssm_state = new_ssm_state.clone(memory_format=torch.contiguous_format)  # not a view of every chunk's state
        y = self._skip_and_gate(y, x, z)
        return self._output(y, z, z0, x0, d_mlp, zxbcdt.dtype), new_conv_state, new_ssm_state

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, nheads={self.nheads}, headdim={self.headdim}, "
                f"ngroups={self.ngroups}, d_ssm={self.d_ssm}, chunk_size={self.chunk_size}, "
                f"backend={self.backend!r}")


def create_mamba2(d_model: int, **kwargs) -> nn.Module:
    """Build a ``Mamba2`` layer; kwargs set to None are dropped so config files can leave them unset.

    Args:
        d_model: model width.
        **kwargs: any ``Mamba2`` keyword argument (d_state, headdim, ngroups, chunk_size, backend, ...).

    Shapes:
        the returned module maps (B, L, d_model) -> (B, L, d_model).
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return Mamba2(d_model, **kwargs)
