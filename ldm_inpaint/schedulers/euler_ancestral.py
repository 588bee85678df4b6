"""Euler ancestral sampling: Euler steps down to σ_down, then fresh noise of scale σ_up, with
σ_up² = σ_next²(σ² − σ_next²)/σ² and σ_down² = σ_next² − σ_up² (k-diffusion `get_ancestral_step`, η = 1; the
ancestral DDPM step of Ho et al. 2020 written in σ notation).

Equal step for step to diffusers 0.42.1 EulerAncestralDiscreteScheduler, drawing the noise the same way.
"""

import torch

from .base import SigmaScheduler
from .schedule import SchedulerConfig, denoised_from, randn_like


class EulerAncestral(SigmaScheduler):
    """Euler ancestral (k-diffusion `sample_euler_ancestral`): x_next = x + (x − D)/σ·(σ_down − σ) + σ_up·z."""

    defaults = dict(timestep_spacing="linspace")

    def __init__(self, config: SchedulerConfig, num_inference_steps: int, strength: float = 1.0):
        if config.prediction_type == "sample":
            raise ValueError("euler_a supports prediction_type epsilon and v_prediction only, as diffusers")
        super().__init__(config, num_inference_steps, strength)

    def step(
        self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.float()
        denoised = denoised_from(model_output, x, sigma, self.config.prediction_type)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        x = x + randn_like(model_output, generator) * sigma_up  # drawn on every step, the last one included
        return x.to(model_output.dtype)
