"""The RPG generator (rpg.model, rpg.generate, rpg.checkpoint): shapes, causality, generation modes, checkpoints.

Tolerances: causality and checkpoint round trips are exact (torch.equal); the three generation modes agree within
1e-4 absolute (tokens are O(1)): the denoiser runs on different batch sizes, which changes float32 summation order
(measured: ~1e-6 relative per denoiser call), and DDIM's x0 estimate divides by sqrt(abar_t) (~1/160 at t = 999).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_model_config
from rpg.checkpoint import FORMAT, load_rpg, save_rpg
from rpg.config import DiffusionConfig
from rpg.diffusion import create_diffusion
from rpg.generate import GENERATION_MODES, generate_state_dicts, generate_tokens
from rpg.config import resolve_model_config
from rpg.model import RPG
from rpg.nn.recurrent import RECURRENT_KINDS
from rpg.tokenize import Tokenizer
from rpg.unconditional import make_score_validator
from rpg.utils import CheckpointError, save_safetensors_atomic

# 3 "layers" of 4, 1 and 3 tokens (N = 8)
LAYER_INDEX = torch.tensor([0, 0, 0, 0, 1, 2, 2, 2])
TOKEN_INDEX = torch.tensor([0, 1, 2, 3, 0, 0, 1, 2])
N = len(LAYER_INDEX)


def _randomise(model: RPG, seed: int = 0, scale: float = 0.2) -> RPG:
    """Move every parameter and BatchNorm statistic off its (partly zero) init, so outputs depend on everything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("recurrent", RECURRENT_KINDS)
@pytest.mark.parametrize("position", ["2d", "1d", "learnable"])
def test_forward_shapes(recurrent, position):
    """prototypes -> (B, N, d_model); denoiser (M, L) -> (M, L); with permutation states and a task condition."""
    torch.manual_seed(0)
    cfg = tiny_model_config(recurrent=recurrent, position=position, condition="task", permutation_state=True)
    model = RPG(cfg, LAYER_INDEX, TOKEN_INDEX, n_permutation_states=5)
    b = 3
    perm = torch.tensor([0, 4, 2])
    cond = torch.randint(0, 2, (b, 10)).float()
    proto = model.prototypes(b, perm, cond)
    assert proto.shape == (b, N, cfg.d_model)
    assert torch.isfinite(proto).all()
    m = 7
    out = model.denoiser(torch.randn(m, cfg.token_size), torch.randint(0, 1000, (m,)), proto.reshape(-1, 32)[:m])
    assert out.shape == (m, cfg.token_size)
    # learnable position tables are parameters, fixed ones are not saved
    names = dict(model.named_parameters())
    assert ("position.table" in names) == (position == "learnable")
    assert model.n_permutation_states == 5
    loss = proto.square().mean() + out.square().mean()
    loss.backward()
    assert model.permutation.weight.grad is not None and model.task_encoder.mlp[0].weight.grad is not None


def test_missing_perm_or_cond_raises():
    cfg = tiny_model_config(condition="task", permutation_state=True)
    model = RPG(cfg, LAYER_INDEX, TOKEN_INDEX, n_permutation_states=2)
    with pytest.raises(ValueError, match="perm"):
        model.prototypes(1, None, torch.zeros(1, 10))
    with pytest.raises(ValueError, match="cond"):
        model.prototypes(1, torch.zeros(1, dtype=torch.long), None)


@pytest.mark.parametrize("recurrent", RECURRENT_KINDS)
@pytest.mark.parametrize("j", [0, 3, 5, N - 1])
def test_causality_of_prototypes(recurrent, j):
    """Perturbing the (learnable) position input of token j leaves prototypes < j bit-identical and changes j.

    For the recurrent kinds, later tokens change too (information flows forward); for "none" nothing but j changes.
    """
    torch.manual_seed(1)
    cfg = tiny_model_config(recurrent=recurrent, position="learnable")
    model = RPG(cfg, LAYER_INDEX, TOKEN_INDEX).eval()
    with torch.no_grad():
        before = model.prototypes(2)
        model.position.table[j] += torch.randn(cfg.d_model)
        after = model.prototypes(2)
    assert torch.equal(before[:, :j], after[:, :j]), f"{recurrent}: prototypes before token {j} changed"
    assert not torch.allclose(before[:, j], after[:, j])
    if j < N - 1:
        later_changed = not torch.allclose(before[:, j + 1:], after[:, j + 1:], atol=1e-7, rtol=0)
        assert later_changed == (recurrent != "none"), recurrent


def _fitted_tokenizer(token_size: int = 16) -> Tokenizer:
    sds = []
    for s in range(3):
        torch.manual_seed(s)
        net = nn.Sequential(nn.Linear(3, 10), nn.ReLU(), nn.Linear(10, 2))
        sds.append(net.state_dict())
    return Tokenizer.fit(sds, token_size)


@pytest.mark.parametrize("recurrent", ["mamba", "lstm"])
def test_generation_modes_agree_with_deterministic_ddim(recurrent):
    """sequential / partial / full give the same tokens (DDIM, eta = 0, same seed) within 1e-4."""
    torch.manual_seed(2)
    tok = _fitted_tokenizer()
    cfg = tiny_model_config(recurrent=recurrent, permutation_state=True)
    model = _randomise(RPG(cfg, tok.layer_index, tok.token_index, n_permutation_states=3), scale=0.05)
    diffusion = create_diffusion(DiffusionConfig())
    outs = {}
    for mode in GENERATION_MODES:
        outs[mode] = generate_tokens(model, diffusion, 2, perm=torch.tensor([0, 2]), sampler="ddim", steps=8,
                                     eta=0.0, clip_x0=4.0, mode=mode, tokens_per_call=3,
                                     generator=torch.Generator().manual_seed(5))
        assert outs[mode].shape == (2, tok.n_tokens, tok.token_size)
        assert torch.isfinite(outs[mode]).all()
    torch.testing.assert_close(outs["sequential"], outs["full"], atol=1e-4, rtol=0)
    torch.testing.assert_close(outs["partial"], outs["full"], atol=1e-4, rtol=0)
    assert not torch.allclose(outs["full"][0], outs["full"][1])  # two different samples
    with pytest.raises(ValueError, match="mode"):
        generate_tokens(model, diffusion, 1, mode="parallel")


def _model_recording_conv_dtypes() -> tuple[Tokenizer, RPG, list[torch.dtype]]:
    """A small random unconditional RPG whose denoiser convolutions append their output dtype to the returned list."""
    torch.manual_seed(2)
    tok = _fitted_tokenizer()
    model = _randomise(RPG(tiny_model_config(), tok.layer_index, tok.token_index), scale=0.05)
    seen: list[torch.dtype] = []
    for m in model.denoiser.modules():
        if isinstance(m, nn.Conv1d):
            m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return tok, model, seen


@pytest.mark.parametrize("amp", ["none", "cuda", "bf16"])
def test_amp_mode_decides_the_sampling_precision_on_cpu(amp):
    """generate_tokens(amp=...): on a CPU the denoiser runs in bfloat16 under `bf16` only (as train.amp); the
    tokens come back float32 either way, and bf16 sampling stays near float32 sampling (same noise, relative L2)."""
    tok, model, seen = _model_recording_conv_dtypes()
    diffusion = create_diffusion(DiffusionConfig())

    def sample(mode: str) -> torch.Tensor:
        return generate_tokens(model, diffusion, 2, sampler="ddim", steps=8, eta=0.0, clip_x0=4.0, amp=mode,
                               generator=torch.Generator().manual_seed(5))

    reference = sample("none")
    seen.clear()
    tokens = sample(amp)
    assert set(seen) == {torch.bfloat16 if amp == "bf16" else torch.float32}
    assert tokens.dtype == torch.float32
    if amp == "bf16":
        assert not torch.equal(tokens, reference)
        # bf16 keeps ~3 significant digits per pass; over 8 DDIM steps of a random model: ~1 % (measured 0.97 %)
        assert (tokens - reference).norm() / reference.norm() < 0.05
    else:
        assert torch.equal(tokens, reference)



@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_score_validator_samples_in_the_generators_precision(amp):
    """The training validator (rpg.unconditional.make_score_validator) draws its models in `amp`, the precision the
    final samples use: the denoiser's convolutions run in bfloat16 exactly under bf16, and the scores differ."""
    tok, model, seen = _model_recording_conv_dtypes()
    dcfg = DiffusionConfig(sampler="ddim", sample_steps=4, eta=0.0)
    score = lambda sd: float(sum(v.double().sum() for v in sd.values()))  # noqa: E731 (any function of the weights)
    scores = {mode: make_score_validator(tok, dcfg, score, 2, seed=3, amp=mode)(model)["score"]
              for mode in ("none", amp)}
    assert set(seen[len(seen) // 2:]) == {torch.bfloat16 if amp == "bf16" else torch.float32}
    assert (scores["none"] == scores[amp]) == (amp == "none")

def test_checkpoint_round_trip_gives_identical_generation(tmp_path):
    """save_rpg -> load_rpg restores weights, BatchNorm statistics, layout and config; generation is identical."""
    torch.manual_seed(3)
    tok = _fitted_tokenizer()
    cfg = tiny_model_config(condition="task", permutation_state=True, position="learnable")
    model = _randomise(RPG(cfg, tok.layer_index, tok.token_index, n_permutation_states=3))
    dcfg = DiffusionConfig(sample_steps=6)
    path = tmp_path / "gen" / "rpg.safetensors"
    save_rpg(path, model, tok, dcfg, step=42, extra={"note": "test"})
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    loaded, tok2, dcfg2, meta = load_rpg(path)
    assert meta["format"] == FORMAT and meta["step"] == 42 and meta["extra"] == {"note": "test"}
    assert loaded.cfg == cfg and dcfg2 == dcfg and tok2.layout() == tok.layout()
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    kwargs = dict(perm=torch.tensor([1, 2]), cond=torch.tensor([[0, 1] * 5, [1, 0] * 5]).float(), sampler="ddim",
                  steps=6, eta=1.0, mode="partial", tokens_per_call=4)
    diffusion = create_diffusion(dcfg)
    a = generate_state_dicts(model, tok, diffusion, 2, generator=torch.Generator().manual_seed(9), **kwargs)
    b = generate_state_dicts(loaded, tok2, create_diffusion(dcfg2), 2, generator=torch.Generator().manual_seed(9),
                             **kwargs)
    for sa, sb in zip(a, b):
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def _assert_checkpoint_error(path):
    with pytest.raises(CheckpointError) as info:
        load_rpg(path)
    assert str(path) in str(info.value)


def test_load_rpg_truncated_file(tmp_path):
    tok = _fitted_tokenizer()
    model = RPG(tiny_model_config(), tok.layer_index, tok.token_index)
    path = tmp_path / "rpg.safetensors"
    save_rpg(path, model, tok, DiffusionConfig(), step=1)
    data = path.read_bytes()
    for cut in (len(data) // 2, 7, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        _assert_checkpoint_error(bad)


def test_load_rpg_random_bytes(tmp_path):
    bad = tmp_path / "random.safetensors"
    bad.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                  dtype=torch.uint8).numpy().tobytes())
    _assert_checkpoint_error(bad)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _assert_checkpoint_error(empty)
    _assert_checkpoint_error(tmp_path / "does_not_exist.safetensors")


def test_load_rpg_foreign_safetensors(tmp_path):
    """A valid safetensors file that is not an RPG checkpoint; and an RPG-formatted one with broken metadata."""
    foreign = tmp_path / "head.safetensors"
    save_safetensors_atomic({"0.weight": torch.zeros(2, 2)}, foreign, {"arch": "binary_head"})
    _assert_checkpoint_error(foreign)
    no_meta = tmp_path / "nometa.safetensors"
    save_safetensors_atomic({"w": torch.zeros(3)}, no_meta, {})
    _assert_checkpoint_error(no_meta)
    broken = tmp_path / "broken.safetensors"
    save_safetensors_atomic({"w": torch.zeros(3)}, broken, {"format": FORMAT, "step": 1})
    _assert_checkpoint_error(broken)
    # right metadata, wrong weights
    tok = _fitted_tokenizer()
    model = RPG(tiny_model_config(), tok.layer_index, tok.token_index)
    good = tmp_path / "good.safetensors"
    save_rpg(good, model, tok, DiffusionConfig(), step=1)
    from rpg.utils import load_safetensors

    tensors, meta = load_safetensors(good)
    tensors.pop("denoiser.cond_proj.weight")  # (num_batches_tracked would be tolerated by BatchNorm itself)
    wrong = tmp_path / "wrong_weights.safetensors"
    save_safetensors_atomic(tensors, wrong, meta)
    _assert_checkpoint_error(wrong)


def test_resolve_model_config_presets():
    cfg = resolve_model_config({"size": "tiny", "recurrent": "lstm", "token_size": None})
    assert cfg.token_size == 256 and cfg.d_model == 256 and cfg.recurrent == "lstm"
    assert cfg.denoiser_channels == (1, 32, 64, 128, 64, 32, 1)
    with pytest.raises(ValueError, match="size"):
        resolve_model_config({"size": "huge"})


@pytest.mark.parametrize("checkpoint_tokens", [None, 7, 16])
def test_activation_checkpointing_gives_the_same_gradients(checkpoint_tokens):
    """The Mamba stack with activation checkpointing - per block (None), or per segment of tokens through the whole
    stack, cut inside a scan chunk (7) or on chunk boundaries (16) - computes the same outputs and gradients."""
    from rpg.nn.recurrent import MambaStack

    torch.manual_seed(0)
    kw = dict(d_state=8, d_conv=4, expand=2, headdim=16)
    plain = MambaStack(32, 2, **kw)
    ckpt = MambaStack(32, 2, **kw, checkpoint_activations=True, checkpoint_tokens=checkpoint_tokens)
    for model in (plain, ckpt):
        for layer in model.layers:
            layer.chunk_size = 8  # several scan chunks per sequence (and per segment of 16)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 45, 32, requires_grad=True)
    grads = []
    for model in (plain, ckpt):
        model.train()
        x.grad = None
        out = model(x)
        out.square().sum().backward()
        grads.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in model.parameters()]))
    (o1, g1, p1), (o2, g2, p2) = grads
    assert torch.allclose(o1, o2, atol=1e-5) and torch.allclose(g1, g2, atol=1e-4)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(p1, p2))


def test_segment_states_do_not_keep_the_segment_alive():
    """The (conv, ssm) state a segment hands to the next owns its memory: a view would keep the segment's whole
    conv input (or every chunk's state) alive while the state lives - under segment checkpointing, every segment's,
    so a training step's memory would grow by ~4 KB per token (measured by bench_train_memory.py)."""
    from rpg.nn.mamba import Mamba2

    layer = Mamba2(32, d_state=8, d_conv=4, expand=2, headdim=16)
    layer.chunk_size = 8
    _, conv_state, ssm_state = layer.forward_with_state(torch.randn(1, 64, 32))
    for state in (conv_state, ssm_state):
        assert state.untyped_storage().nbytes() == state.numel() * state.element_size()


@pytest.mark.parametrize("setting", ["unconditional", "task_learnable_early"])
def test_activation_checkpointing_gives_the_same_rpg_loss_and_gradients(setting):
    """A whole RPG training loss (DiffusionObjective) and every gradient: plain vs. segments of 16 tokens, where
    only the picked prototypes outlive their segment (RPG.prototypes_at). Unconditional with permutation states and
    2-D positions; task-conditioned with learnable positions, picked tokens only in the first 20 of 40 (the last
    segment is not run)."""
    from rpg.diffusion import GaussianDiffusion
    from rpg.train import DiffusionObjective

    n = 40
    layer_index = torch.arange(n) // 10
    token_index = torch.arange(n) % 10
    task = setting == "task_learnable_early"
    extra = {"condition": "task", "position": "learnable"} if task else {"condition": "none"}
    results = []
    for ckpt in (dict(), dict(checkpoint_activations=True, checkpoint_tokens=16)):
        torch.manual_seed(0)
        cfg = resolve_model_config({"size": "cpu_tiny", "token_size": 16, "d_model": 32, "d_state": 8,
                                    "headdim": 16, **extra, **ckpt})
        model = RPG(cfg, layer_index, token_index, n_permutation_states=3)
        objective = DiffusionObjective(model, GaussianDiffusion())
        assert model.recurrent.picked_segments() == bool(ckpt)  # the segment path is the one under test
        gen = torch.Generator().manual_seed(1)
        x0 = torch.randn(2, n, 16, generator=gen)
        mask = torch.ones(n, 16, dtype=torch.bool)
        picked = torch.randperm(2 * n, generator=gen)[:24]
        if task:
            picked = picked[picked % n < 20]
        cond = torch.tensor([[1, 0] * 5, [0, 1] * 5]).float() if task else None
        loss = objective(x0, torch.arange(2), mask, picked, torch.tensor([0, 2]), cond,
                         torch.Generator().manual_seed(2))
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (l1, g1), (l2, g2) = results
    assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys()
    for k in g1:
        assert torch.allclose(g1[k], g2[k], rtol=1e-4, atol=1e-5), k


def test_classifier_free_guidance_null_code_and_guided_sampling():
    """The null task code (drop) makes the prototypes independent of the task; guidance 1 is the conditional
    sampler, guidance 0 the unconditional one, and any scale combines the two denoiser outputs linearly."""
    from rpg.generate import GuidedDenoiser

    tok = _fitted_tokenizer()
    model = _randomise(RPG(tiny_model_config(condition="task"), tok.layer_index, tok.token_index))
    a, b = torch.zeros(1, 10), torch.ones(1, 10)
    null = torch.ones(1, dtype=torch.bool)
    assert not torch.allclose(model.prototypes(1, cond=a), model.prototypes(1, cond=b))
    torch.testing.assert_close(model.prototypes(1, cond=a, drop=null), model.prototypes(1, cond=b, drop=null))
    torch.testing.assert_close(model.prototypes(1, cond=a, drop=~null), model.prototypes(1, cond=a))

    x, t, p = torch.randn(3, tok.token_size), torch.tensor([5, 50, 500]), torch.randn(3, 2 * model.cfg.d_model)
    d = model.cfg.d_model
    cond, uncond = model.denoiser(x, t, p[:, :d]), model.denoiser(x, t, p[:, d:])
    # the guided denoiser runs both halves as one batch of 6, the reference as two of 3: a matmul's blocking (and so
    # its round-off) depends on the batch on some CPUs (AMD EPYC: 8e-6 relative, amplified by the scale)
    torch.testing.assert_close(GuidedDenoiser(model.denoiser, 2.5)(x, t, p), uncond + 2.5 * (cond - uncond),
                               rtol=1e-4, atol=1e-4)

    diffusion = create_diffusion(DiffusionConfig())
    def sample(cond: torch.Tensor, guidance: float | None) -> torch.Tensor:
        return generate_tokens(model, diffusion, 1, cond=cond, steps=4, guidance=guidance,
                               generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sample(a, 1.0), sample(a, None))  # the model's default scale is 1
    torch.testing.assert_close(sample(a, 0.0), sample(b, 0.0))  # scale 0: the unconditional model alone
    assert not torch.allclose(sample(a, 3.0), sample(a, 1.0))
