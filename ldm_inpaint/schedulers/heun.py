"""Heun's 2nd-order method on the probability-flow ODE: Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models" (arXiv:2206.00364), Algorithm 1 (no churn): an Euler step to σ_next, then
one more model call there and the step redone with the mean slope; the last step (to σ = 0) is plain Euler.

Equal step for step to diffusers 0.42.1 HeunDiscreteScheduler: two model calls per step, so `timesteps` repeats
every timestep after the first ((2n − 1) calls), and strength cuts it at 2·t_start.
"""

import numpy as np
import torch

from .base import SigmaScheduler
from .schedule import SchedulerConfig, denoised_from


class Heun(SigmaScheduler):
    """Heun (Karras et al. 2022, Alg. 1): x_next = x + (d(x, σ) + d(x̃, σ_next))/2·(σ_next − σ)."""

    model_calls_per_step = 2
    defaults = dict(timestep_spacing="linspace", beta_start=0.00085, beta_end=0.012, clip_sample=False)

    def __init__(self, config: SchedulerConfig, num_inference_steps: int, strength: float = 1.0):
        super().__init__(config, num_inference_steps, strength)
        self.x = self.d = None  # start and slope of the current Euler step

    def schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        timesteps, sigmas = super().schedule(n)
        # model call 2j (j ≥ 1) is at σ_j for the Euler step, call 2j − 1 at σ_j for the correction before it
        return (np.concatenate([timesteps[:1], timesteps[1:].repeat(2)]),
                np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]]))

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
