"""EDM (Karras et al. 2022) for a variance-exploding diffusion over sets of K embedding rows.

Everything here works on tensors of shape (B, K, d) and is independent of the network: preconditioning,
the weighted denoising loss, noise-level distributions for training, classifier-free guidance, and the
two samplers (deterministic Heun on the probability-flow ODE, Euler-Maruyama on the reverse SDE).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from r4t_pipeline.config import NoiseSchedule

# A denoiser closure: (x (B, K, d), sigma) -> D(x; sigma) (B, K, d), condition already bound.
Denoise = Callable[[Tensor, float], Tensor]


def sample_sigmas(schedule: NoiseSchedule, n: int, generator: torch.Generator, device: torch.device | str) -> Tensor:
    """Draw n training noise levels from `schedule`."""
    if schedule.kind == "tangent":
        # sigma = tan(u (atan sigma_max - atan sigma_min) + atan sigma_min), u ~ U(0, 1)
        lo, hi = math.atan(schedule.sigma_min), math.atan(schedule.sigma_max)
        u = torch.rand(n, generator=generator, device=device)
        return torch.tan(u * (hi - lo) + lo)
    # ln sigma ~ N(P_mean, P_std^2)
    return (schedule.p_mean + schedule.p_std * torch.randn(n, generator=generator, device=device)).exp()


class EDMPrecond(nn.Module):
    """D(x; sigma, cond) = c_skip x + c_out F(c_in x; c_noise, cond), with F the raw network.

    F is called as F(x, c_noise (B,), cond, cond_mask, drop_cond); see `SetDenoiser`.
    """

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        self.net = net
        self.register_buffer("sigma_data", torch.tensor(float(sigma_data)))

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | float,
        cond: Tensor,
        cond_mask: Tensor | None = None,
        drop_cond: Tensor | None = None,
    ) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0]).reshape(-1, 1, 1)
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = sigma.log().flatten() / 4
        return c_skip * x + c_out * self.net(c_in * x, c_noise, cond, cond_mask, drop_cond)


def loss_weight(sigma: Tensor, sigma_data: Tensor | float) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 = 1 / c_out^2: unit loss weight on F."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(
    precond: nn.Module,
    y: Tensor,
    sigma: Tensor,
    noise: Tensor,
    cond: Tensor,
    cond_mask: Tensor | None = None,
    drop_cond: Tensor | None = None,
) -> Tensor:
    """Per-sample lambda(sigma) ||D(y + sigma n; sigma, cond) - y||^2 (mean over rows and dims), shape (B,).
    `precond` may be wrapped for data-parallel training (DistributedDataParallel: the EDMPrecond is its `module`)."""
    denoised = precond(y + sigma.view(-1, 1, 1) * noise, sigma, cond, cond_mask, drop_cond)
    sigma_data = getattr(precond, "module", precond).sigma_data
    return loss_weight(sigma, sigma_data) * (denoised - y).square().mean(dim=(1, 2))


def guided_denoiser(
    precond: EDMPrecond, cond: Tensor, cond_mask: Tensor | None = None, guidance: float = 0.1
) -> Denoise:
    """Classifier-free guidance: D = D_uncond + (1 + w)(D_cond - D_uncond); w = 0 is exactly D_cond. Both
    estimates come from one forward pass over the batch stacked twice (the second copy with its condition
    dropped): half the calls, which is what small batches on a CPU pay for."""
    if guidance == 0:
        return lambda x, sigma: precond(x, sigma, cond, cond_mask)
    batch = cond.shape[0]
    both_cond = torch.cat([cond, cond])
    both_mask = None if cond_mask is None else torch.cat([cond_mask, cond_mask])
    drop = torch.arange(2 * batch, device=cond.device) >= batch

    def denoise(x: Tensor, sigma: float) -> Tensor:
        d_cond, d_uncond = precond(torch.cat([x, x]), sigma, both_cond, both_mask, drop_cond=drop).chunk(2)
        return d_uncond + (1 + guidance) * (d_cond - d_uncond)

    return denoise


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then a final 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + i / max(steps - 1, 1) * (lo - hi)) ** rho for i in range(steps)] + [0.0]


def heun_sample(
    denoise: Denoise,
    shape: tuple[int, int, int],
    *,
    steps: int,
    sigma_min: float,
    sigma_max: float,
    generator: torch.Generator,
    device: torch.device | str,
    rho: float = 7.0,
) -> Tensor:
    """EDM deterministic sampler: Heun's 2nd-order method on dx/dsigma = (x - D(x; sigma)) / sigma."""
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    x = sigmas[0] * torch.randn(shape, generator=generator, device=device)
    for t_cur, t_next in itertools.pairwise(sigmas):
        slope = (x - denoise(x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * slope
        if t_next > 0:  # 2nd-order correction, except on the last step to sigma = 0 (Euler there)
            slope_next = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * (slope + slope_next) / 2
        x = x_next
    return x


def dpm2m_sample(
    denoise: Denoise,
    shape: tuple[int, int, int],
    *,
    steps: int,
    sigma_min: float,
    sigma_max: float,
    generator: torch.Generator,
    device: torch.device | str,
    rho: float = 7.0,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022; k-diffusion's `sample_dpmpp_2m`): one network call per step, the
    exact exponential-integrator step x' = (sigma'/sigma) x + (1 - sigma'/sigma) D in log-sigma time, with D
    extrapolated linearly from this call and the previous one (second order; first order on the first step). The
    last step, to sigma = 0, lands on the denoised estimate. Uses `steps` network evaluations, against Heun's
    2 * steps - 1."""
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    x = sigmas[0] * torch.randn(shape, generator=generator, device=device)
    previous, h_previous = None, None
    for t_cur, t_next in itertools.pairwise(sigmas[:-1]):
        denoised = denoise(x, t_cur)
        h = math.log(t_cur / t_next)
        estimate = denoised if previous is None else denoised + (denoised - previous) * h / (2 * h_previous)
        x = (t_next / t_cur) * x + (1 - t_next / t_cur) * estimate
        previous, h_previous = denoised, h
    return denoise(x, sigmas[-2])


def network_calls(sampler: str, steps: int) -> int:
    """Denoiser evaluations per sample: Heun corrects every step but the last with a second call."""
    return 2 * steps - 1 if sampler == "heun" else steps


def sde_sample(
    denoise: Denoise,
    shape: tuple[int, int, int],
    *,
    steps: int,
    sigma_min: float,
    sigma_max: float,
    generator: torch.Generator,
    device: torch.device | str,
    rho: float = 7.0,
) -> Tensor:
    """Reverse VE SDE dx = -2 sigma sigma' grad log p dt + sqrt(2 sigma sigma') dW with sigma(t) = t,
    score = (D - x) / sigma^2, by Euler-Maruyama on the Karras grid; the last step to sigma = 0 is the
    denoised mean D(x; sigma_min). Uses `steps` network evaluations."""
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    x = sigmas[0] * torch.randn(shape, generator=generator, device=device)
    for t_cur, t_next in itertools.pairwise(sigmas[:-1]):
        h = t_cur - t_next  # positive: time runs backwards
        score = (denoise(x, t_cur) - x) / t_cur**2
        noise = torch.randn(shape, generator=generator, device=device)
        x = x + 2 * t_cur * h * score + math.sqrt(2 * t_cur * h) * noise
    return denoise(x, sigmas[-2])
