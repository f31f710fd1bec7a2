"""Property-based tests (hypothesis) of the invariants users rely on: a state dict survives tokenize -> detokenize,
a checkpoint written and read back is identical, and any truncation of a safetensors file gives the one-line error.

tokenize -> detokenize is exact for everything copied (integer buffers, scalars, names, order, shapes, dtypes) and
exact up to float rounding for generated layers: the per-layer normalisation (v - mean) / std and its inverse round
(measured: up to 1 ulp of float32 with float32 tokens, ~1e-16 relative for float64). The bounds below are that.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rpg.cli.main import main
from rpg.tokenize import VAR_FLOOR, Tokenizer
from rpg.utils import CheckpointError, load_safetensors, save_safetensors_atomic

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)


@st.composite
def collections(draw) -> list[dict[str, torch.Tensor]]:
    """Two checkpoints of one random architecture: float layers of random shapes, dtypes, scales and offsets,
    maybe a BatchNorm running_var (positive, log-domain transform), an integer buffer and a scalar."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    layers = []
    for i in range(draw(st.integers(1, 4))):
        shape = draw(shapes.filter(lambda s: torch.Size(s).numel() > 1))
        layers.append((f"layer{i}.weight", shape, draw(st.sampled_from(FLOAT_DTYPES)),
                       10 ** draw(st.floats(-3, 3)), draw(st.floats(-100, 100))))
    with_var, with_buffers = draw(st.booleans()), draw(st.booleans())
    state_dicts = []
    for _ in range(2):
        sd = {name: (torch.randn(shape, generator=g) * scale + offset).to(dtype)
              for name, shape, dtype, scale, offset in layers}
        if with_var:
            sd["bn.running_var"] = torch.rand(5, generator=g) * 3 + 1e-3
        if with_buffers:
            sd["bn.num_batches_tracked"] = torch.tensor(draw(st.integers(0, 10**6)))
            sd["steps"] = torch.randint(-1000, 1000, (3,), generator=g)
            sd["temperature"] = torch.tensor([0.5])  # a scalar: copied, not generated
        state_dicts.append(sd)
    return state_dicts


def _bound(layer, v: torch.Tensor, token_dtype: torch.dtype) -> torch.Tensor:
    """Largest rounding error of tokenize -> detokenize for the values `v` of one layer (a few ulps)."""
    eps_tok = torch.finfo(token_dtype).eps
    eps_w = torch.finfo(getattr(torch, layer.dtype)).eps
    v = v.double()
    if layer.transform == "log_var":
        y = torch.log(v.clamp_min(VAR_FLOOR) / layer.var_scale + 0.05)
        spread = (v + 0.05 * layer.var_scale) * (1 + y.abs() + abs(layer.mean) / layer.std)
    else:
        spread = v.abs() + abs(layer.mean) + layer.std
    return 8 * eps_tok * spread + eps_w * v.abs()


@PROPERTY
@given(collections(), st.integers(1, 16), st.sampled_from([torch.float32, torch.float64]))
def test_tokenize_detokenize_round_trip(state_dicts, token_size, token_dtype):
    tok = Tokenizer.fit(state_dicts, token_size)
    for sd in state_dicts[:1]:  # copied entries come from the first checkpoint
        back = tok.detokenize(tok.tokenize(sd, dtype=token_dtype))
        assert list(back) == [layer.name for layer in tok.layers] + list(tok.copied)
        assert set(back) == set(sd)
        for layer in tok.layers:
            a, b = sd[layer.name], back[layer.name]
            assert a.shape == b.shape and a.dtype == b.dtype
            err = (a.double() - b.double()).abs()
            assert bool((err <= _bound(layer, a, token_dtype)).all()), (layer, err.max())
        for name in tok.copied:
            assert back[name].dtype == sd[name].dtype and torch.equal(back[name], sd[name]), name


@PROPERTY
@given(collections(), st.integers(1, 16))
def test_tokens_are_finite_and_padding_is_zero(state_dicts, token_size):
    tok = Tokenizer.fit(state_dicts, token_size)
    tokens = tok.tokenize(state_dicts[1])
    assert bool(torch.isfinite(tokens).all())
    assert bool((tokens[~tok.mask] == 0).all())


TENSOR_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8,
                 torch.uint8, torch.bool]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


@st.composite
def tensors(draw) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_.]{0,15}", fullmatch=True), min_size=1, max_size=5,
                          unique=True))
    out = {}
    for name in names:
        shape = draw(st.lists(st.integers(0, 5), max_size=3).map(tuple))  # 0-d and empty tensors included
        dtype = draw(st.sampled_from(TENSOR_DTYPES))
        values = torch.randn(shape, generator=g) * 100
        out[name] = values.to(dtype) if dtype.is_floating_point else values.to(torch.int64).to(dtype)
    return out


@PROPERTY
@given(tensors(), st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=5))
def test_checkpoint_written_and_read_back_is_identical(tmp_path, state, metadata):
    path = tmp_path / "ckpt.safetensors"
    save_safetensors_atomic(state, path, metadata)
    back, meta = load_safetensors(path)
    assert set(back) == set(state) and meta == metadata
    for name, t in state.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t), name


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("trunc") / "m.safetensors"
    g = torch.Generator().manual_seed(0)
    save_safetensors_atomic({"w": torch.randn(4, 8, generator=g), "b": torch.randn(4, generator=g).half(),
                             "n": torch.tensor(7)}, path, {"arch": "mlp", "note": "x" * 50})
    return path.read_bytes()


@PROPERTY
@given(data=st.data())
def test_any_truncation_gives_the_one_line_error(tmp_path, checkpoint_bytes, data):
    cut = data.draw(st.integers(0, len(checkpoint_bytes) - 1))
    path = tmp_path / "cut.safetensors"
    path.write_bytes(checkpoint_bytes[:cut])
    with pytest.raises(CheckpointError) as info:
        load_safetensors(path)
    assert str(path) in str(info.value) and len(str(info.value).splitlines()) == 1, str(info.value)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["evaluate", str(path)])
    lines = err.getvalue().strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("rpg evaluate: error:") and str(path) in lines[0]
