"""Parameter tokenization (rpg.tokenize): exact round trips on real modules, layout, masks, normalisation.

Tolerances: tokens in float64 give back bit-identical float32 tensors (torch.equal); float32 tokens give back the
weights within 1e-6 relative (plus 1e-6 * layer std absolute, for entries near zero).
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from rpg.tokenize import VAR_FLOOR, Tokenizer


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.features(x))


def _conv_checkpoint(seed: int) -> dict[str, torch.Tensor]:
    """A conv net with non-trivial BatchNorm statistics (a few train-mode passes) and perturbed affine params."""
    torch.manual_seed(seed)
    net = SmallConvNet()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3, 8, 8) * (1 + 0.1 * seed))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _vit_checkpoint(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                              depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():  # move every tensor off its (often constant) init, as training would
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def conv_collection():
    return [_conv_checkpoint(s) for s in range(4)]


@pytest.fixture(scope="module")
def vit_collection():
    return [_vit_checkpoint(s) for s in range(3)]


COLLECTIONS = ["conv_collection", "vit_collection"]


@pytest.mark.parametrize("collection", COLLECTIONS)
@pytest.mark.parametrize("token_size", [16, 64])
def test_float64_tokens_round_trip_bit_identical(collection, token_size, request):
    """state dict -> float64 tokens -> state dict gives back every tensor bit for bit (torch.equal), dtypes kept."""
    sds = request.getfixturevalue(collection)
    tok = Tokenizer.fit(sds, token_size)
    for sd in sds:
        back = tok.detokenize(tok.tokenize(sd, dtype=torch.float64))
        assert set(back) == set(sd)
        for key, value in sd.items():
            assert back[key].dtype == value.dtype, key
            assert back[key].shape == value.shape, key
            assert torch.equal(back[key], value), f"{key} differs after a float64 round trip"


@pytest.mark.parametrize("collection", COLLECTIONS)
def test_float32_tokens_round_trip_close(collection, request):
    """float32 tokens give back the weights within 1e-6 relative (+ 1e-6 * layer std absolute)."""
    sds = request.getfixturevalue(collection)
    tok = Tokenizer.fit(sds, 32)
    for sd in sds:
        tokens = tok.tokenize(sd)
        assert tokens.dtype == torch.float32
        back = tok.detokenize(tokens)
        for layer in tok.layers:
            ref = sd[layer.name].double()
            scale = layer.std * (layer.var_scale if layer.transform == "log_var" else 1.0)
            torch.testing.assert_close(back[layer.name].double(), ref, rtol=1e-6, atol=1e-6 * scale,
                                       msg=lambda m, n=layer.name: f"{n}: {m}")
        for key in tok.copied:
            assert torch.equal(back[key], sd[key])


def test_batchnorm_running_var_transform_and_copied_buffers(conv_collection):
    """running_var is generated in the log domain, num_batches_tracked is copied (not generated)."""
    tok = Tokenizer.fit(conv_collection, 16)
    by_name = {layer.name: layer for layer in tok.layers}
    var_keys = [k for k in conv_collection[0] if k.endswith("running_var")]
    assert var_keys
    for key in var_keys:
        assert by_name[key].transform == "log_var"
        expected_scale = 0.95 * torch.stack([sd[key].double() for sd in conv_collection]).mean().item()
        assert by_name[key].var_scale == pytest.approx(expected_scale, rel=1e-12)
    for key in conv_collection[0]:
        if key.endswith("num_batches_tracked"):
            assert key in tok.copied and key not in by_name
            assert tok.copied[key].dtype == torch.int64
            assert torch.equal(tok.detokenize(torch.zeros(tok.n_tokens, tok.token_size))[key],
                               conv_collection[0][key])
    others = [layer for layer in tok.layers if not layer.name.endswith("running_var")]
    assert all(layer.transform == "none" for layer in others)


def test_running_var_positive_for_random_tokens(conv_collection):
    """Any tokens (here N(0, 3^2), plus extreme +-50) decode to running_var >= VAR_FLOOR > 0 and finite."""
    tok = Tokenizer.fit(conv_collection, 16)
    gen = torch.Generator().manual_seed(0)
    candidates = [3.0 * torch.randn(tok.n_tokens, tok.token_size, generator=gen),
                  torch.full((tok.n_tokens, tok.token_size), -50.0),
                  torch.full((tok.n_tokens, tok.token_size), 50.0)]
    for tokens in candidates:
        sd = tok.detokenize(tokens)
        for key, value in sd.items():
            if key.endswith("running_var"):
                assert (value >= VAR_FLOOR * (1 - 1e-6)).all() and (value > 0).all(), key
                assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("collection", COLLECTIONS)
@pytest.mark.parametrize("token_size", [7, 32])
def test_mask_and_position_indices(collection, token_size, request):
    """Mask counts equal numel per layer; layer_index/token_index and offsets describe contiguous layers."""
    sds = request.getfixturevalue(collection)
    tok = Tokenizer.fit(sds, token_size)
    assert tok.mask.shape == (tok.n_tokens, token_size)
    assert int(tok.mask.sum()) == tok.n_params == sum(layer.numel for layer in tok.layers)
    expected_offset = 0
    for i, layer in enumerate(tok.layers):
        assert layer.offset == expected_offset
        assert layer.n_tokens == math.ceil(layer.numel / token_size)
        assert layer.numel == sds[0][layer.name].numel()
        rows = slice(layer.offset, layer.offset + layer.n_tokens)
        assert int(tok.mask[rows].sum()) == layer.numel
        # real positions come first, padding only at the end of the layer's last token
        flat = tok.mask[rows].reshape(-1)
        assert flat[: layer.numel].all() and not flat[layer.numel:].any()
        assert (tok.layer_index[rows] == i).all()
        assert torch.equal(tok.token_index[rows], torch.arange(layer.n_tokens))
        expected_offset += layer.n_tokens
    assert expected_offset == tok.n_tokens
    # padded positions of the tokens are zero
    tokens = tok.tokenize(sds[0])
    assert (tokens[~tok.mask] == 0).all()


def test_only_float_tensors_with_several_elements_are_generated(vit_collection):
    tok = Tokenizer.fit(vit_collection, 64)
    generated = {layer.name for layer in tok.layers}
    for key, value in vit_collection[0].items():
        assert (key in generated) == (value.is_floating_point() and value.numel() > 1), key


@pytest.mark.parametrize("collection", COLLECTIONS)
def test_layout_json_round_trip(collection, request):
    """Tokenizer.from_json(tok.to_json()) has the same layout and gives the same tokens and state dicts exactly."""
    sds = request.getfixturevalue(collection)
    tok = Tokenizer.fit(sds, 32)
    again = Tokenizer.from_json(tok.to_json())
    assert again.layout() == tok.layout()
    assert torch.equal(again.mask, tok.mask)
    assert torch.equal(again.layer_index, tok.layer_index)
    assert torch.equal(again.token_index, tok.token_index)
    gen = torch.Generator().manual_seed(1)
    random_tokens = torch.randn(tok.n_tokens, tok.token_size, generator=gen)
    for sd in sds:
        assert torch.equal(again.tokenize(sd), tok.tokenize(sd))
        assert torch.equal(again.tokenize(sd, dtype=torch.float64), tok.tokenize(sd, dtype=torch.float64))
    a, b = again.detokenize(random_tokens), tok.detokenize(random_tokens)
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("collection", COLLECTIONS)
def test_per_layer_normalisation_statistics(collection, request):
    """Over the collection, each layer's normalised values have mean ~0 (|mean| < 1e-6) and per-checkpoint std
    averaging 1 (within 1e-6); pooled std lies in [0.5, 2]. Constant layers stay constant (normalised to 0)."""
    sds = request.getfixturevalue(collection)
    tok = Tokenizer.fit(sds, 32)
    tokens = torch.stack([tok.tokenize(sd, dtype=torch.float64) for sd in sds])  # (K, N, L)
    for layer in tok.layers:
        rows = slice(layer.offset, layer.offset + layer.n_tokens)
        values = tokens[:, rows].reshape(len(sds), -1)[:, : layer.numel]  # (K, numel)
        assert abs(values.mean().item()) < 1e-6, layer.name
        per_ckpt_std = values.std(dim=1, unbiased=False)
        if per_ckpt_std.max() < 1e-9:  # constant within every checkpoint
            continue
        assert per_ckpt_std.mean().item() == pytest.approx(1.0, abs=1e-6), layer.name
        assert 0.5 < values.std(unbiased=False).item() < 2.0, layer.name


def test_tokenize_rejects_wrong_state_dict(conv_collection):
    tok = Tokenizer.fit(conv_collection, 16)
    sd = dict(conv_collection[0])
    key = tok.layers[0].name
    from rpg.utils import CheckpointError

    with pytest.raises(CheckpointError, match=key):
        tok.tokenize({k: v for k, v in sd.items() if k != key})
    with pytest.raises(CheckpointError, match=key):
        tok.tokenize({**sd, key: torch.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        tok.detokenize(torch.zeros(tok.n_tokens + 1, tok.token_size))
