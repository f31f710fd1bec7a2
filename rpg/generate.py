"""Sampling parameters from a trained RPG: tokens -> state dicts, in three generation modes.

The recurrent model is not auto-regressive, so the prototypes of all tokens are computed in one pass; the modes
differ only in how many tokens go through the denoiser per call (memory vs. speed):
sequential = 1 token per call, partial = `tokens_per_call` (default 256), full = all tokens of all samples.
With a deterministic sampler (DDIM, eta = 0) the three modes give the same weights up to float rounding
(the denoiser's arithmetic differs slightly with batch size; ~1e-6 measured).
"""

from __future__ import annotations

import contextlib

import torch

from rpg.config import DiffusionConfig, GenerateConfig
from rpg.diffusion import GaussianDiffusion, create_diffusion
from rpg.model import RPG
from rpg.tokenize import Tokenizer
from rpg.vision.preprocess import resolve_amp

GENERATION_MODES = ("sequential", "partial", "full")


def _autocast(device: torch.device, amp: str):
    """bfloat16 autocast where `amp` (rpg.vision.preprocess.AMP_MODES, as train.amp) asks for it on `device`."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if resolve_amp(amp, device) else contextlib.nullcontext()


@torch.no_grad()
def generate_tokens(model: RPG, diffusion: GaussianDiffusion, n_samples: int, *, perm: torch.Tensor | None = None,
                    cond: torch.Tensor | None = None, sampler: str = DiffusionConfig.sampler,
                    steps: int = DiffusionConfig.sample_steps, eta: float = DiffusionConfig.eta,
                    clip_x0: float | None = DiffusionConfig.clip_x0, mode: str = GenerateConfig.mode,
                    tokens_per_call: int = GenerateConfig.tokens_per_call,
                    generator: torch.Generator | None = None, amp: str = "none",
                    guidance: float | None = None) -> torch.Tensor:
    """Generate `n_samples` token sequences.

    Args:
        perm: (n_samples,) permutation-state rows, for models with permutation states (random rows if None).
        cond: (n_samples, condition_dim) task bits, for task-conditioned models.
        amp: bfloat16 autocast of the passes (`train.amp`'s modes: none, cuda, auto, bf16).
        generator: all noise is drawn from it, on its device. A CPU generator (what `sample_models` uses) makes the
            samples independent of the device; a CUDA one is faster on a GPU (DDPM-1000 draws the noise of every
            step: on the CPU that alone takes ~10 ms per 256 tokens of 8192 per step).
        guidance: classifier-free guidance scale s (None: the model's `guidance_scale`): every denoiser output is
            null + s * (conditional - null), the null one from the null task code; 1 = the conditional alone.
    Returns:
        tokens (n_samples, N, token_size), float32 on CPU.
    """
    if mode not in GENERATION_MODES:
        raise ValueError(f"unknown generation mode '{mode}' (expected one of {', '.join(GENERATION_MODES)})")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n_tok, length = model.n_tokens, model.cfg.token_size
    if model.n_permutation_states and perm is None:
        perm = torch.randint(0, model.n_permutation_states, (n_samples,), generator=generator,
                             device=_generator_device(generator))
    perm = perm.to(device) if perm is not None else None
    cond = cond.to(device) if cond is not None else None
    scale = model.cfg.guidance_scale if guidance is None else guidance
    denoiser = model.denoiser
    with _autocast(device, amp):
        proto = model.prototypes(n_samples, perm, cond).float().reshape(n_samples * n_tok, -1)  # (S*N, D)
        if scale != 1.0 and cond is not None:
            null = torch.ones(n_samples, dtype=torch.bool, device=device)
            proto_null = model.prototypes(n_samples, perm, cond, null).float().reshape(n_samples * n_tok, -1)
            proto = torch.cat([proto, proto_null], dim=1)  # (S*N, 2D): both halves travel with their rows
            denoiser = GuidedDenoiser(model.denoiser, scale)
    noise = torch.randn((n_samples * n_tok, length), generator=generator,
                        device=_generator_device(generator))  # (S*N, L)
    chunk = {"sequential": 1, "partial": tokens_per_call, "full": n_samples * n_tok}[mode]
    out = torch.empty(n_samples * n_tok, length)
    for start in range(0, n_samples * n_tok, chunk):
        rows = slice(start, start + chunk)
        with _autocast(device, amp):
            x0 = diffusion.sample(denoiser, proto[rows], length, sampler=sampler, steps=steps, eta=eta,
                                  clip_x0=clip_x0, noise=noise[rows], generator=generator)
        out[rows] = x0.float().cpu()
    model.train(was_training)
    return out.view(n_samples, n_tok, length)


class GuidedDenoiser:
    """Classifier-free guidance around a denoiser: called with (x_t, t, [proto_cond | proto_null]) it returns
    out_null + scale * (out_cond - out_null) (one batched call). Linear in the output, so it serves every
    parameterisation (eps, x0, v) alike."""

    def __init__(self, denoiser, scale: float):
        self.denoiser, self.scale = denoiser, scale

    def __call__(self, x: torch.Tensor, t: torch.Tensor, proto: torch.Tensor) -> torch.Tensor:
        d = proto.shape[1] // 2
        out = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([proto[:, :d], proto[:, d:]]))
        cond, null = out.chunk(2)
        return null + self.scale * (cond - null)


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def generate_state_dicts(model: RPG, tokenizer: Tokenizer, diffusion: GaussianDiffusion, n_samples: int,
                         **kwargs) -> list[dict[str, torch.Tensor]]:
    """Generate `n_samples` complete state dicts (see `generate_tokens` for the keyword arguments)."""
    tokens = generate_tokens(model, diffusion, n_samples, **kwargs)
    return [tokenizer.detokenize(t) for t in tokens]


def sample_models(model: RPG, tokenizer: Tokenizer, diffusion_cfg: DiffusionConfig, n_samples: int, *, seed: int,
                  perm: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                  mode: str = GenerateConfig.mode, tokens_per_call: int = GenerateConfig.tokens_per_call,
                  amp: str = "none", guidance: float | None = None) -> list[dict[str, torch.Tensor]]:
    """`n_samples` state dicts with the sampler of `diffusion_cfg`, all noise from a CPU generator seeded `seed`.

    Args:
        perm: (n_samples,) permutation-state rows (random rows when the model has them and perm is None).
        cond: (n_samples, condition_dim) task bits, for task-conditioned models.
        guidance: classifier-free guidance scale (None: the model's `guidance_scale`; see `generate_tokens`).
    """
    return generate_state_dicts(
        model, tokenizer, create_diffusion(diffusion_cfg), n_samples, perm=perm, cond=cond,
        sampler=diffusion_cfg.sampler, steps=diffusion_cfg.sample_steps, eta=diffusion_cfg.eta,
        clip_x0=diffusion_cfg.clip_x0, mode=mode, tokens_per_call=tokens_per_call,
        generator=torch.Generator().manual_seed(seed), amp=amp, guidance=guidance)
