"""Heun's 2nd-order method on the probability-flow ODE: Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models" (arXiv:2206.00364), Algorithm 1 (no churn): an Euler step to σ_next, then
one more model call there and the step redone with the mean slope; the last step (to σ = 0) is plain Euler.

Equal step for step to diffusers 0.42.1 HeunDiscreteScheduler: two model calls per step, so `timesteps` repeats
every timestep after the first ((2n − 1) calls), and strength cuts it at 2·t_start.
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


class Heun:
    """Heun (Karras et al. 2022, Alg. 1): x_next = x + (d(x, σ) + d(x̃, σ_next))/2·(σ_next − σ)."""

    order = 2
    defaults = dict(timestep_spacing="linspace", beta_start=0.00085, beta_end=0.012, clip_sample=False)

    def __init__(self, config: SchedulerConfig, num_inference_steps: int, strength: float = 1.0):
        self.config = config
        begin = first_kept_step(num_inference_steps, strength, config.num_train_timesteps) * self.order
        timesteps, sigmas = sigma_schedule(config, alphas_cumprod(config), num_inference_steps)
        timesteps, sigmas = torch.from_numpy(timesteps), torch.from_numpy(sigmas)
        # model call 2j (j ≥ 1) is at σ_j for the Euler step, call 2j − 1 at σ_j for the correction before it
        self.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])[begin:]
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])[begin:]
        self.init_noise_sigma = ve_init_noise_sigma(sigmas, config.timestep_spacing)
        self.x = self.d = None  # start and slope of the current Euler step

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x / (self.sigmas[i] ** 2 + 1) ** 0.5

    def step(
        self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if i % 2 == 0:  # Euler step from σ to σ_next; remember where it started
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
            denoised = self.denoised(model_output, x, sigma)
            self.x, self.d = x, (x - denoised) / sigma
            return x + self.d * (sigma_next - sigma)
        sigma, sigma_next = self.sigmas[i - 1], self.sigmas[i]  # correction: the slope at the Euler point x̃
        denoised = self.denoised(model_output, x, sigma_next)
        d = (self.d + (x - denoised) / sigma_next) / 2
        return self.x + d * (sigma_next - sigma)

    def denoised(self, model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        denoised = denoised_from(model_output, x, sigma, self.config.prediction_type)
        if self.config.clip_sample:
            denoised = denoised.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return denoised

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return x0 + noise * self.sigmas.to(x0)[i]
