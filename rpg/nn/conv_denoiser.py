"""The 1-D convolutional denoiser shared by all parameter tokens.

A token is a 1-channel signal of length `token_size`. An encoder/decoder of same-length convolutions (channels
e.g. 1-32-64-128-64-32-1, kernel 7) predicts the noise (or the clean token or the velocity: `diffusion.prediction`;
the network is the same). Conditioning follows the reference design: the prototype
from the recurrent model, projected to `token_size`, is added to the feature map before every convolution, and a
sinusoidal-then-MLP timestep embedding (also of length `token_size`) modulates it multiplicatively. Decoder
layers receive the matching encoder activations as skip connections.

Normalisation is BatchNorm, as in the reference code. Per-sample norms (GroupNorm/InstanceNorm over the token
length) were tried first and failed: they erase the amplitude of x_t, which eps-prediction needs. At sampling the
model is in eval mode, so BatchNorm uses its running statistics and a token's output does not depend on the other
tokens of its batch: the sequential, partially parallel and fully parallel generation modes agree.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Shapes: t (M,) int -> (M, dim) float."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes, differentiable: the gradient of a sum shared by all processes is the sum of their
    gradients (torch.distributed.nn.functional.all_reduce does the same but is deprecated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class BatchNorm1d(nn.BatchNorm1d):
    """`nn.BatchNorm1d` whose training statistics are those of the whole data-parallel batch.

    Under DDP (a process group of several processes, training mode) the per-channel mean and variance are all-reduced
    over the processes (differentiably), so a data-parallel step normalises exactly as one process holding the whole
    diffusion batch would, and the running statistics agree on every process. `nn.SyncBatchNorm` does the same but
    only on GPUs; this also runs on CPU (gloo). Alone, or in eval mode, it is plain BatchNorm1d (same state dict).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        xf = x.float()  # (M, C, T); M may differ between processes, even be 0
        count = xf.new_tensor([float(xf.shape[0] * xf.shape[2])])
        total = all_reduce(torch.cat([xf.sum((0, 2)), count]))  # (C + 1,)
        n = total[-1].detach()
        mean = total[:-1] / n.clamp_min(1.0)  # (C,)
        centred = xf - mean[None, :, None]
        var = all_reduce((centred * centred).sum((0, 2))) / n.clamp_min(1.0)  # biased, as in normalisation
        y = centred * torch.rsqrt(var + self.eps)[None, :, None]
        if self.affine:
            y = y * self.weight[None, :, None] + self.bias[None, :, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                unbiased = var.detach() * n / (n - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(unbiased, self.momentum)
        return y.to(x.dtype)


def _norm(channels: int) -> nn.Module:
    return BatchNorm1d(channels)


class ConvDenoiser(nn.Module):
    """Denoising network: forward(x_t, t, cond) -> eps (or x0 or v: `rpg.diffusion.GaussianDiffusion.prediction`).

    Args:
        token_size: length of a token.
        channels: channel widths, symmetric, starting and ending with 1 (e.g. (1, 32, 64, 128, 64, 32, 1)).
        cond_dim: width of the conditioning prototype (the recurrent model's d_model).
        kernel_size: convolution kernel (odd).
    Shapes:
        x_t (M, token_size), t (M,), cond (M, cond_dim) -> (M, token_size)
    """

    def __init__(self, token_size: int, channels: tuple[int, ...], cond_dim: int, kernel_size: int = 7,
                 time_freq_dim: int = 256):
        super().__init__()
        channels = tuple(channels)
        if len(channels) < 3 or channels[0] != 1 or channels[-1] != 1 or channels != channels[::-1]:
            raise ValueError(f"denoiser channels must be symmetric and start/end with 1, got {channels}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.token_size = token_size
        self.time_freq_dim = time_freq_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(time_freq_dim, token_size), nn.SiLU(), nn.Linear(token_size, token_size)
        )
        self.cond_proj = nn.Linear(cond_dim, token_size)
        n_conv = len(channels) - 1
        n_enc = n_conv // 2 + n_conv % 2  # encoder takes the middle layer when the count is odd
        pad = kernel_size // 2
        self.encoder = nn.ModuleList(
            nn.Conv1d(channels[i], channels[i + 1], kernel_size, padding=pad) for i in range(n_enc)
        )
        self.encoder_act = nn.ModuleList(nn.Sequential(_norm(channels[i + 1]), nn.ELU()) for i in range(n_enc))
        self.decoder = nn.ModuleList(
            nn.Conv1d(channels[i], channels[i + 1], kernel_size, padding=pad) for i in range(n_enc, n_conv)
        )
        self.decoder_act = nn.ModuleList(
            nn.Sequential(_norm(channels[i + 1]), nn.ELU()) if i + 1 < n_conv else nn.Identity()
            for i in range(n_enc, n_conv)
        )
        # Decoder j reads channels[n_enc + j] == channels[n_conv - n_enc - j] (symmetry), the output width of encoder
        # layer n_conv - n_enc - j - 1; the last encoder output is the decoder's own input, so it is not re-added.
        self._skip_from = [n_conv - n_enc - j - 1 for j in range(len(self.decoder))]
        self._skip_from = [s if 0 <= s < n_enc - 1 else -1 for s in self._skip_from]
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Start with neutral modulation (x + c) * (1 + 0) and a zero output layer, so training begins from eps = 0.
        nn.init.zeros_(self.time_mlp[-1].weight)
        nn.init.zeros_(self.time_mlp[-1].bias)
        nn.init.zeros_(self.decoder[-1].weight)
        nn.init.zeros_(self.decoder[-1].bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.time_mlp(timestep_embedding(t, self.time_freq_dim))[:, None, :]  # (M, 1, T)
        c = self.cond_proj(cond)[:, None, :]  # (M, 1, T)
        h = x_t[:, None, :]  # (M, 1, T)
        skips = []
        for conv, act in zip(self.encoder, self.encoder_act):
            h = act(conv((h + c) * scale))  # (M, C, T)
            skips.append(h)
        for j, (conv, act) in enumerate(zip(self.decoder, self.decoder_act)):
            src = self._skip_from[j]
            if src >= 0:
                h = h + skips[src]
            h = act(conv((h + c) * scale))
        return h[:, 0, :]  # (M, T)
