"""Tests of the pure-PyTorch Mamba2 (rpg.nn.mamba) and its SSD scan (rpg.nn.ssd).

CPU tests run in float64 against independent step-by-step recurrences. The `gpu` tests run only where CUDA
is available (and, for the parity test, where mamba_ssm imports); elsewhere they are skipped.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from rpg.nn.mamba import MAMBA_SSM_AVAILABLE, Mamba2, RMSNormGated, create_mamba2
from rpg.nn.ssd import ssd_chunked, ssd_naive

F64_TOL = 1e-9  # float64: the chunked and sequential forms differ only by summation order (seen: ~1e-14)
HAS_CUDA = torch.cuda.is_available()


def _ssd_inputs(b, L, h, p, g, n, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, h, p, generator=gen, dtype=dtype)
    dt = F.softplus(torch.randn(b, L, h, generator=gen, dtype=dtype) - 1.0)  # positive step sizes
    A = -torch.empty(h, dtype=dtype).uniform_(0.5, 8.0, generator=gen)  # strong and weak decays
    B = torch.randn(b, L, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, L, g, n, generator=gen, dtype=dtype)
    init = torch.randn(b, h, p, n, generator=gen, dtype=dtype)
    return x, dt, A, B, C, init


# ---------------------------------------------------------------------------- SSD scan


@pytest.mark.parametrize("L,chunk_size", [(1, 16), (37, 16), (300, 64), (64, 64), (100, 1)])
@pytest.mark.parametrize("ngroups", [1, 2, 4])
@pytest.mark.parametrize("with_init", [False, True])
def test_ssd_chunked_matches_naive_float64(L, chunk_size, ngroups, with_init):
    x, dt, A, B, C, init = _ssd_inputs(b=2, L=L, h=4, p=3, g=ngroups, n=5)
    init = init if with_init else None
    y, state = ssd_chunked(x, dt, A, B, C, chunk_size, initial_states=init, return_final_state=True)
    y_ref, state_ref = ssd_naive(x, dt, A, B, C, chunk_size, initial_states=init, return_final_state=True)
    assert y.shape == (2, L, 4, 3) and y.dtype == torch.float64
    assert state.shape == (2, 4, 3, 5)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=F64_TOL)
    torch.testing.assert_close(state, state_ref, rtol=0, atol=F64_TOL)


def test_ssd_chunked_gradients_match_naive_float64():
    inputs = [t.requires_grad_() for t in _ssd_inputs(b=1, L=45, h=4, p=2, g=2, n=3)]
    grads = []
    for fn in (ssd_chunked, ssd_naive):
        y, state = fn(*inputs[:5], chunk_size=16, initial_states=inputs[5], return_final_state=True)
        grads.append(torch.autograd.grad((y.sin().sum() + state.cos().sum()), inputs))
    for g_chunked, g_naive in zip(*grads):
        torch.testing.assert_close(g_chunked, g_naive, rtol=0, atol=1e-8)


def test_ssd_float32_and_low_precision_inputs():
    x, dt, A, B, C, _ = _ssd_inputs(b=2, L=200, h=4, p=8, g=1, n=16)
    y_ref = ssd_naive(x, dt, A, B, C)
    y32 = ssd_chunked(*(t.float() for t in (x, dt, A, B, C)), chunk_size=64)
    assert y32.dtype == torch.float32
    assert (y32.double() - y_ref).abs().max() < 1e-4 * y_ref.abs().max()  # float32 accumulation
    y16 = ssd_chunked(*(t.bfloat16() for t in (x, dt, A, B, C)), chunk_size=64)
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()


def test_ssd_empty_sequence_keeps_state():
    x, dt, A, B, C, init = _ssd_inputs(b=1, L=0, h=2, p=2, g=1, n=3)
    for fn in (ssd_chunked, ssd_naive):
        y, state = fn(x, dt, A, B, C, initial_states=init, return_final_state=True)
        assert y.shape == (1, 0, 2, 2) and torch.equal(state, init)


def test_ssd_rejects_bad_shapes():
    x, dt, A, B, C, _ = _ssd_inputs(b=1, L=8, h=4, p=2, g=3, n=2)  # 4 heads can't share 3 groups
    with pytest.raises(ValueError, match="multiple of ngroups"):
        ssd_chunked(x, dt, A, B, C)


# ---------------------------------------------------------------------------- full layer vs recurrence


def naive_mamba2_forward(m: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """Mamba2 one token at a time (like mamba_ssm's `step()`), written from the equations, not from Mamba2.

    Keeps a rolling conv window (B, conv_dim, d_conv) and the SSM state (B, H, P, N); loops over heads too.
    """
    b, L, _ = u.shape
    H, P, G, N = m.nheads, m.headdim, m.ngroups, m.d_state
    d_mlp, d_ssm = m.d_inner - m.d_ssm, m.d_ssm
    conv_dim = d_ssm + 2 * G * N
    w_conv = m.conv1d.weight[:, 0, :]  # (conv_dim, d_conv)
    conv_window = u.new_zeros(b, conv_dim, m.d_conv)
    state = u.new_zeros(b, H, P, N)
    A = -torch.exp(m.A_log)
    D = m.D.reshape(H, P) if m.D_has_hdim else m.D[:, None].expand(H, P)
    outs = []
    for t in range(L):
        v = F.linear(u[:, t], m.in_proj.weight, m.in_proj.bias)
        z0, x0, z = v[:, :d_mlp], v[:, d_mlp:2 * d_mlp], v[:, 2 * d_mlp:2 * d_mlp + d_ssm]
        xBC, dt = v[:, 2 * d_mlp + d_ssm:2 * d_mlp + d_ssm + conv_dim], v[:, -H:]
        conv_window = torch.cat([conv_window[:, :, 1:], xBC[:, :, None]], dim=-1)
        xBC = (conv_window * w_conv).sum(-1)
        if m.conv1d.bias is not None:
            xBC = xBC + m.conv1d.bias
        xBC = xBC * torch.sigmoid(xBC)
        x = xBC[:, :d_ssm].reshape(b, H, P)
        Bt = xBC[:, d_ssm:d_ssm + G * N].reshape(b, G, N)
        Ct = xBC[:, d_ssm + G * N:].reshape(b, G, N)
        dt = torch.log1p(torch.exp(dt + m.dt_bias))
        dt = dt.clamp(min=m.dt_limit[0], max=m.dt_limit[1])
        y = torch.empty(b, H, P, dtype=u.dtype)
        for hh in range(H):
            grp = hh // (H // G)
            decay = torch.exp(dt[:, hh] * A[hh])[:, None, None]
            state[:, hh] = decay * state[:, hh] + (dt[:, hh, None] * x[:, hh])[:, :, None] * Bt[:, grp, None, :]
            y[:, hh] = (state[:, hh] * Ct[:, grp, None, :]).sum(-1) + D[hh] * x[:, hh]
        y = y.reshape(b, d_ssm)
        gate = z * torch.sigmoid(z)
        if m.rmsnorm:
            yg = (y if m.norm_before_gate else y * gate).reshape(b, G, d_ssm // G)
            yg = yg / torch.sqrt(yg.pow(2).mean(-1, keepdim=True) + m.norm.eps)
            y = yg.reshape(b, d_ssm) * m.norm.weight
            y = y * gate if m.norm_before_gate else y
        else:
            y = y * gate
        if d_mlp:
            y = torch.cat([z0 * torch.sigmoid(z0) * x0, y], dim=-1)
        outs.append(F.linear(y, m.out_proj.weight, m.out_proj.bias))
    return torch.stack(outs, dim=1)


def _randomise(m: Mamba2, seed: int = 0) -> Mamba2:
    """Move D, the norm weight and the biases away from their init values so every term is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if name in ("D", "norm.weight") or name.endswith(".bias"):
                prm.copy_(torch.randn(prm.shape, generator=gen, dtype=prm.dtype))
    return m


LAYER_CASES = {
    "defaults": {},
    "ngroups2": dict(ngroups=2),
    "d_ssm<d_inner+D_has_hdim": dict(d_ssm=32, D_has_hdim=True),
    "no_rmsnorm+bias": dict(rmsnorm=False, bias=True),
    "norm_before_gate+dt_limit": dict(norm_before_gate=True, dt_limit=(0.02, 0.08), ngroups=4),
    "d_conv1+no_conv_bias": dict(d_conv=1, conv_bias=False),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_mamba2_torch_path_matches_naive_recurrence(case):
    torch.manual_seed(0)
    kw = dict(d_state=8, headdim=8, chunk_size=16, backend="torch")
    kw.update(LAYER_CASES[case])
    m = _randomise(Mamba2(32, dtype=torch.float64, **kw).double())
    u = torch.randn(2, 37, 32, dtype=torch.float64)  # 37: two full chunks of 16 and a ragged tail
    out = m(u)
    ref = naive_mamba2_forward(m, u)
    err = (out - ref).abs().max().item()
    print(f"[{case}] max |torch path - naive recurrence| = {err:.2e} (output scale {ref.abs().max():.2f})")
    assert out.shape == u.shape
    assert err < F64_TOL  # observed 5e-16 to 2e-15 on CPU (float64, torch 2.14.1)


def test_mamba2_float32_close_to_float64():
    torch.manual_seed(0)
    m = _randomise(Mamba2(64, d_state=16, headdim=16, chunk_size=32, backend="torch"))
    u = torch.randn(2, 100, 64)
    out32 = m(u)
    out64 = m.double()(u.double())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- parameters


def test_state_dict_matches_mamba_ssm_table():
    """STYLE.md §3: d_model=256 with mamba_ssm's defaults."""
    m = Mamba2(256)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (1288, 256),
        "conv1d.weight": (768, 1, 4),
        "conv1d.bias": (768,),
        "dt_bias": (8,),
        "A_log": (8,),
        "D": (8,),
        "norm.weight": (512,),
        "out_proj.weight": (256, 512),
    }
    assert all(getattr(getattr(m, k), "_no_weight_decay", False) for k in ("A_log", "D", "dt_bias"))
    # Variants: D per channel, no norm, biases, SSM on part of d_inner.
    v = Mamba2(256, D_has_hdim=True, rmsnorm=False, bias=True, d_ssm=256, ngroups=2, d_state=64)
    shapes = {k: tuple(t.shape) for k, t in v.state_dict().items()}
    assert shapes["D"] == (256,) and "norm.weight" not in shapes
    assert shapes["in_proj.weight"] == (2 * 512 + 2 * 2 * 64 + 4, 256) and shapes["in_proj.bias"] == (1284,)
    assert shapes["conv1d.weight"] == (256 + 2 * 2 * 64, 1, 4) and shapes["out_proj.weight"] == (256, 512)


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    m = Mamba2(256, headdim=16)  # 32 heads
    dt = F.softplus(m.dt_bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    A = torch.exp(m.A_log.detach())
    assert A.min() >= 1 and A.max() <= 16
    assert torch.equal(m.D.detach(), torch.ones(32)) and torch.equal(m.norm.weight.detach(), torch.ones(512))
    assert Mamba2(64, dtype=torch.float64).D.dtype == torch.float32  # as mamba_ssm: D made without dtype
    # Same seed, same parameters: initialisation is deterministic.
    torch.manual_seed(0)
    m2 = Mamba2(256, headdim=16)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_backward_gives_finite_gradients():
    torch.manual_seed(0)
    m = create_mamba2(64, d_state=16, headdim=16, ngroups=2, chunk_size=32, backend="torch", layer_idx=None)
    u = torch.randn(2, 70, 64, requires_grad=True)
    m(u).square().mean().backward()
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0
    for name, prm in m.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), name
        assert prm.grad.abs().sum() > 0, name


def test_backend_argument():
    with pytest.raises(ValueError, match="backend"):
        Mamba2(32, backend="triton")
    if not MAMBA_SSM_AVAILABLE:
        with pytest.raises(RuntimeError, match="mamba_ssm"):
            Mamba2(32, backend="cuda")
    with pytest.raises(ValueError, match="multiple of headdim"):
        Mamba2(32, headdim=48)
    norm = RMSNormGated(8, group_size=4)
    assert [k for k, _ in norm.named_parameters()] == ["weight"]


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_torch_path_on_cuda_matches_cpu():
    torch.manual_seed(0)
    m = _randomise(Mamba2(64, d_state=16, headdim=16, ngroups=2, chunk_size=32, backend="torch").double())
    u = torch.randn(2, 100, 64, dtype=torch.float64)
    torch.testing.assert_close(m.cuda()(u.cuda()).cpu(), m.cpu()(u), rtol=0, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and MAMBA_SSM_AVAILABLE), reason="needs CUDA and mamba_ssm")
@pytest.mark.parametrize("backend", ["cuda", "torch"])
@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("use_mem_eff_path", [True, False])
def test_state_dict_loads_into_mamba_ssm_and_outputs_match(backend, ngroups, use_mem_eff_path):
    """Both directions of load_state_dict(strict=True), then equal outputs on CUDA.

    The fused path (use_mem_eff_path=True) needs the causal_conv1d CUDA extension; without it only the Triton SSD
    path (use_mem_eff_path=False, conv through nn.Conv1d inside mamba_ssm) can be compared.
    """
    from mamba_ssm.modules.mamba2 import Mamba2 as RefMamba2

    if use_mem_eff_path:
        pytest.importorskip("causal_conv1d", reason="the fused path needs the causal_conv1d extension")
    torch.manual_seed(0)
    kw = dict(d_state=64, headdim=32, ngroups=ngroups, chunk_size=64, use_mem_eff_path=use_mem_eff_path)
    ours = _randomise(Mamba2(256, backend=backend, **kw)).cuda()
    ref = RefMamba2(256, **kw).cuda()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(ref.state_dict(), strict=True)  # and back
    u = torch.randn(2, 300, 256, device="cuda")
    with torch.no_grad():
        out_ref, out = ref(u), ours(u)
    err = (out - out_ref).abs().max().item()
    print(f"[{backend}, ngroups={ngroups}] max |ours - mamba_ssm| = {err:.2e}")
    if backend == "cuda":
        # The very same kernel call with the very same tensors.
        torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-6)
    else:
        # Triton's fp32 dot products run in TF32 (10-bit mantissa): about 1e-3 relative.
        torch.testing.assert_close(out, out_ref, rtol=1e-2, atol=5e-3 * out_ref.abs().max().item())
