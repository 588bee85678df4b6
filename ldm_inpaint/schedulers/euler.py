"""Euler's method on the probability-flow ODE dx/dσ = (x − D(x; σ))/σ: Karras et al. 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models" (arXiv:2206.00364), Algorithm 1 without the 2nd-order
correction and without churn.

Equal step for step to diffusers 0.42.1 EulerDiscreteScheduler (s_churn = 0, as the pipelines call it).
"""

import torch

from .schedule import (
    SchedulerConfig,
    alphas_cumprod,
    denoised_from,
    first_kept_step,
    sigma_schedule,
    ve_init_noise_sigma,
)


class Euler:
    """Euler (Karras et al. 2022, Alg. 1 first-order): x_next = x + (x − D)/σ·(σ_next − σ)."""

    order = 1
    defaults = dict(timestep_spacing="linspace")

    def __init__(self, config: SchedulerConfig, num_inference_steps: int, strength: float = 1.0):
        self.config = config
        begin = first_kept_step(num_inference_steps, strength, config.num_train_timesteps) * self.order
        timesteps, sigmas = sigma_schedule(config, alphas_cumprod(config), num_inference_steps)
        self.timesteps = torch.from_numpy(timesteps)[begin:]
        self.sigmas = torch.from_numpy(sigmas)[begin:]  # one more than timesteps: the final σ = 0
        self.init_noise_sigma = ve_init_noise_sigma(torch.from_numpy(sigmas), config.timestep_spacing)

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x / (self.sigmas[i] ** 2 + 1) ** 0.5  # the UNet sees the variance-preserving x

    def step(
        self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.float()
        denoised = denoised_from(model_output, x, sigma, self.config.prediction_type)
        d = (x - denoised) / sigma
        return (x + d * (sigma_next - sigma)).to(model_output.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return x0 + noise * self.sigmas.to(x0)[i]
