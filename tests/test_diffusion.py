"""DDPM / DDIM (rpg.diffusion.GaussianDiffusion): oracle denoisers, DDIM-T-eta-1 == DDPM, the masked loss.

Tolerances: samples within 1e-4 (absolute, float32 sampling over up to 1000 steps); losses compared exactly
(same generator seed, same arithmetic).
"""

from __future__ import annotations

import pytest
import torch

from rpg.config import DiffusionConfig
from rpg.diffusion import GaussianDiffusion, create_diffusion

M, L = 6, 16


def oracle(diffusion: GaussianDiffusion):
    """A perfect eps-predictor for a known x0, passed as `cond` (M, L): eps = (x_t - sqrt(abar) x0) / sqrt(1-abar)."""
    abar = diffusion.alphas_cumprod

    def denoise(x_t, t, cond):
        a = abar[t][:, None]  # float64
        return ((x_t.double() - a.sqrt() * cond.double()) / (1 - a).sqrt()).float()

    return denoise


_ABAR = GaussianDiffusion(1000, 1e-4, 0.02).alphas_cumprod


def arbitrary_denoiser(x_t, t, cond):
    """A fixed, non-trivial (imperfect) deterministic eps-predictor, mixing positions, time and cond.

    Its leading term sqrt(1 - abar_t) * x_t (the optimal predictor for x0 ~ 0) keeps the samples O(1), so an absolute
    tolerance of 1e-4 is meaningful in float32 (a predictor with bounded output, e.g. plain tanh, drives the samples
    to |x| ~ 300, where float32 round-off alone is ~1e-3).
    """
    s = (1 - _ABAR[t]).sqrt().float()[:, None]
    mixed = x_t + 0.3 * torch.roll(x_t, 1, dims=1) - 0.2 * cond
    return s * x_t + 0.2 * torch.tanh(mixed) + 0.05 * torch.sin(t.float() / 50.0)[:, None]


@pytest.fixture
def x0():
    return 3.0 * torch.rand(M, L, generator=torch.Generator().manual_seed(0)) * 2 - 3.0  # in [-3, 3]


@pytest.fixture
def diffusion():
    return GaussianDiffusion(1000, 1e-4, 0.02)


def test_schedule_matches_paper(diffusion):
    """T = 1000, linear betas 1e-4 -> 0.02, alphas_cumprod decreasing from 1 - 1e-4."""
    assert diffusion.betas[0].item() == pytest.approx(1e-4)
    assert diffusion.betas[-1].item() == pytest.approx(0.02)
    assert diffusion.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)
    assert (diffusion.alphas_cumprod.diff() < 0).all()
    d = create_diffusion(DiffusionConfig())
    assert d.timesteps == 1000 and torch.equal(d.betas, diffusion.betas)


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 1000, 0.0), ("ddim", 20, 0.0), ("ddim", 50, 0.0),
                                               ("ddim", 50, 1.0)])
@pytest.mark.parametrize("clip", [None, 4.0])
def test_oracle_denoiser_recovers_x0(diffusion, x0, sampler, steps, eta, clip):
    """With the true eps, DDPM and DDIM (20/50 steps) return x0 within 1e-4."""
    gen = torch.Generator().manual_seed(1)
    out = diffusion.sample(oracle(diffusion), x0, L, sampler=sampler, steps=steps, eta=eta, clip_x0=clip,
                           generator=gen)
    assert out.shape == (M, L)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize("clip", [None, 1.5])
@pytest.mark.parametrize("denoiser_kind", ["arbitrary", "oracle"])
def test_ddim_all_steps_eta1_equals_ddpm(diffusion, x0, clip, denoiser_kind):
    """DDIM with steps == T and eta == 1 reproduces DDPM (same seed) within 1e-4, with and without clip_x0."""
    den = arbitrary_denoiser if denoiser_kind == "arbitrary" else oracle(diffusion)
    cond = x0
    ddpm = diffusion.sample(den, cond, L, sampler="ddpm", clip_x0=clip, generator=torch.Generator().manual_seed(7))
    ddim = diffusion.sample(den, cond, L, sampler="ddim", steps=1000, eta=1.0, clip_x0=clip,
                            generator=torch.Generator().manual_seed(7))
    assert torch.isfinite(ddpm).all() and torch.isfinite(ddim).all()
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=0)
    # and the samples are genuinely random: another seed gives something else
    other = diffusion.sample(den, cond, L, sampler="ddpm", clip_x0=clip, generator=torch.Generator().manual_seed(8))
    if denoiser_kind == "arbitrary":
        assert (other - ddpm).abs().max() > 1e-2


def test_explicit_noise_makes_ddim_deterministic(diffusion, x0):
    """DDIM eta=0 with a given x_T does not draw from the generator: different generators, same result."""
    noise = torch.randn(M, L, generator=torch.Generator().manual_seed(3))
    a = diffusion.sample(arbitrary_denoiser, x0, L, steps=20, noise=noise, generator=torch.Generator().manual_seed(1))
    b = diffusion.sample(arbitrary_denoiser, x0, L, steps=20, noise=noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddim", 20), ("ddim", 1)])
def test_no_nan_with_wild_denoiser(diffusion, sampler, steps):
    """A badly scaled denoiser (outputs +-10) with clip_x0 gives finite samples within the clip (+ tiny slack)."""
    cond = torch.zeros(M, L)

    def wild(x_t, t, c):
        return 10.0 * torch.sign(torch.sin(x_t * 7.0 + t.float()[:, None]))

    out = diffusion.sample(wild, cond, L, sampler=sampler, steps=steps, eta=0.0, clip_x0=4.0,
                           generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    assert out.abs().max() <= 4.0 + 1e-4


def test_timestep_sequences(diffusion):
    assert diffusion._timesteps(1000) == list(range(999, -1, -1))
    seq = diffusion._timesteps(20)
    assert len(seq) == 20 and seq[0] == 999 and seq[-1] == 0 and seq == sorted(seq, reverse=True)
    assert diffusion._timesteps(5000) == list(range(999, -1, -1))


def test_unknown_sampler_raises(diffusion, x0):
    with pytest.raises(ValueError, match="sampler"):
        diffusion.sample(arbitrary_denoiser, x0, L, sampler="euler")


# ---------------------------------------------------------------------------------------------------------------
# Training loss
# ---------------------------------------------------------------------------------------------------------------


def elementwise_denoiser(x_t, t, cond):
    """Per-position (no mixing across positions), so masked positions cannot influence unmasked outputs."""
    return 0.5 * x_t + 0.1 * torch.cos(t.float())[:, None] + 0.0 * cond.sum(1, keepdim=True)


def test_training_loss_respects_mask(diffusion, x0):
    """Loss is unchanged (exactly) when masked-out positions of x0 change arbitrarily; it changes with a real one."""
    mask = torch.rand(M, L, generator=torch.Generator().manual_seed(5)) > 0.4
    mask[0, 0] = True
    cond = torch.zeros(M, 4)
    base = diffusion.training_loss(elementwise_denoiser, x0, cond, mask, generator=torch.Generator().manual_seed(9))
    changed = x0.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), generator=torch.Generator().manual_seed(11)) * 100.0
    again = diffusion.training_loss(elementwise_denoiser, changed, cond, mask,
                                    generator=torch.Generator().manual_seed(9))
    assert torch.isfinite(base)
    assert torch.equal(base, again)
    real = x0.clone()
    real[0, 0] += 5.0
    moved = diffusion.training_loss(elementwise_denoiser, real, cond, mask, generator=torch.Generator().manual_seed(9))
    assert not torch.equal(base, moved)


def test_training_loss_matches_manual_masked_mse(diffusion, x0):
    """loss == sum(mask * (eps_pred - noise)^2) / sum(mask), with t and noise drawn from the generator in order."""
    mask = torch.ones(M, L, dtype=torch.bool)
    mask[:, L // 2:] = False
    cond = torch.zeros(M, 4)
    loss = diffusion.training_loss(elementwise_denoiser, x0, cond, mask, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    t = torch.randint(0, 1000, (M,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    pred = elementwise_denoiser(diffusion.q_sample(x0, t, noise), t, cond)
    expected = ((pred - noise) ** 2)[mask].mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    unmasked = diffusion.training_loss(elementwise_denoiser, x0, cond, None,
                                       generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(unmasked, ((pred - noise) ** 2).mean(), rtol=1e-6, atol=0)


def test_training_loss_all_masked_is_finite(diffusion, x0):
    """An all-False mask gives 0, not NaN."""
    loss = diffusion.training_loss(elementwise_denoiser, x0, torch.zeros(M, 4), torch.zeros(M, L, dtype=torch.bool),
                                   generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss.item() == 0.0


def test_q_sample_endpoints(diffusion, x0):
    """q_sample at t=0 is x0 up to sqrt(beta_0)-sized noise; at t=T-1 it is almost pure noise."""
    noise = torch.randn(M, L, generator=torch.Generator().manual_seed(2))
    near = diffusion.q_sample(x0, torch.zeros(M, dtype=torch.long), noise)
    far = diffusion.q_sample(x0, torch.full((M,), 999), noise)
    assert (near - x0).abs().max() < 0.05
    assert (far - noise).abs().max() < 0.05


# ---------------------------------------------------------------------------------------------------------------
# x0-prediction
# ---------------------------------------------------------------------------------------------------------------


def x0_view(diffusion: GaussianDiffusion, eps_denoiser):
    """The x0-predictor equivalent to an eps-predictor: x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)."""
    abar = diffusion.alphas_cumprod

    def denoise(x_t, t, cond):
        a = abar[t][:, None]
        return ((x_t.double() - (1 - a).sqrt() * eps_denoiser(x_t, t, cond).double()) / a.sqrt()).float()

    return denoise


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 1000, 0.0), ("ddim", 20, 0.0), ("ddim", 50, 1.0)])
@pytest.mark.parametrize("clip", [None, 1.5])
def test_x0_prediction_samples_like_the_equivalent_eps_predictor(diffusion, x0, sampler, steps, eta, clip):
    """An x0-predictor and the eps-predictor it is equivalent to give the same samples (same noise), and the true
    x0 as the prediction returns it exactly."""
    x0_diffusion = GaussianDiffusion(1000, 1e-4, 0.02, prediction="x0")
    kw = dict(sampler=sampler, steps=steps, eta=eta, clip_x0=clip)
    from_eps = diffusion.sample(arbitrary_denoiser, x0, L, generator=torch.Generator().manual_seed(3), **kw)
    from_x0 = x0_diffusion.sample(x0_view(diffusion, arbitrary_denoiser), x0, L,
                                  generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(from_x0, from_eps, atol=1e-3, rtol=0)
    exact = x0_diffusion.sample(lambda x_t, t, cond: cond, x0, L, generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(exact, x0 if clip is None else x0.clamp(-clip, clip), atol=1e-4, rtol=0)


def test_x0_prediction_loss_targets_the_clean_tokens(diffusion, x0):
    """With prediction="x0" the loss is the MSE to x0 (0 for the oracle), not to the noise."""
    x0_diffusion = create_diffusion(DiffusionConfig(prediction="x0"))
    assert x0_diffusion.prediction == "x0"
    cond = torch.zeros(M, 4)
    oracle_loss = x0_diffusion.training_loss(lambda x_t, t, c: x0, x0, cond, generator=torch.Generator().manual_seed(4))
    assert oracle_loss.item() == 0.0
    loss = x0_diffusion.training_loss(elementwise_denoiser, x0, cond, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    t = torch.randint(0, 1000, (M,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    pred = elementwise_denoiser(diffusion.q_sample(x0, t, noise), t, cond)
    torch.testing.assert_close(loss, ((pred - x0) ** 2).mean(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(prediction="velocity")


# ---------------------------------------------------------------------------------------------------------------
# v-prediction
# ---------------------------------------------------------------------------------------------------------------


def v_view(diffusion: GaussianDiffusion, eps_denoiser):
    """The v-predictor equivalent to an eps-predictor: v = sqrt(abar) eps - sqrt(1-abar) x0(eps)."""
    abar = diffusion.alphas_cumprod

    def denoise(x_t, t, cond):
        a = abar[t][:, None]
        eps = eps_denoiser(x_t, t, cond).double()
        x0_hat = (x_t.double() - (1 - a).sqrt() * eps) / a.sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * x0_hat).float()

    return denoise


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 1000, 0.0), ("ddim", 20, 0.0), ("ddim", 50, 1.0)])
@pytest.mark.parametrize("clip", [None, 1.5])
def test_v_prediction_samples_like_the_equivalent_eps_predictor(diffusion, x0, sampler, steps, eta, clip):
    """A v-predictor and the eps-predictor it is equivalent to give the same samples (same noise); the true
    velocity of a known x0 (the oracle) returns that x0."""
    v_diffusion = create_diffusion(DiffusionConfig(prediction="v"))
    kw = dict(sampler=sampler, steps=steps, eta=eta, clip_x0=clip)
    from_eps = diffusion.sample(arbitrary_denoiser, x0, L, generator=torch.Generator().manual_seed(3), **kw)
    from_v = v_diffusion.sample(v_view(diffusion, arbitrary_denoiser), x0, L,
                                generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(from_v, from_eps, atol=1e-3, rtol=0)
    exact = v_diffusion.sample(v_view(diffusion, oracle(diffusion)), x0, L,
                               generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(exact, x0 if clip is None else x0.clamp(-clip, clip), atol=1e-4, rtol=0)


def test_v_prediction_loss_targets_the_velocity(diffusion, x0):
    """With prediction="v" the loss is the MSE to sqrt(abar) noise - sqrt(1-abar) x0: 0 for the oracle, and
    neither the eps loss nor the x0 loss."""
    v_diffusion = create_diffusion(DiffusionConfig(prediction="v"))
    cond = torch.zeros(M, 4)
    abar = diffusion.alphas_cumprod

    def oracle_v(x_t, t, c):
        a = abar[t][:, None].to(x_t.dtype)
        noise = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    assert v_diffusion.training_loss(oracle_v, x0, cond, generator=torch.Generator().manual_seed(4)).item() < 1e-10
    loss = v_diffusion.training_loss(elementwise_denoiser, x0, cond, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    t = torch.randint(0, 1000, (M,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    pred = elementwise_denoiser(diffusion.q_sample(x0, t, noise), t, cond)
    a = abar[t][:, None].float()
    torch.testing.assert_close(loss, ((pred - (a.sqrt() * noise - (1 - a).sqrt() * x0)) ** 2).mean(), rtol=1e-5, atol=0)
    eps_loss = diffusion.training_loss(elementwise_denoiser, x0, cond, generator=torch.Generator().manual_seed(4))
    assert abs(loss.item() - eps_loss.item()) > 1e-3
