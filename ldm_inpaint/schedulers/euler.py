"""Euler's method on the probability-flow ODE dx/dσ = (x − D(x; σ))/σ: Karras et al. 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models" (arXiv:2206.00364), Algorithm 1 without the 2nd-order
correction and without churn.

Equal step for step to diffusers 0.42.1 EulerDiscreteScheduler (s_churn = 0, as the pipelines call it).
"""

import torch

from .base import SigmaScheduler
from .schedule import denoised_from


class Euler(SigmaScheduler):
    """Euler (Karras et al. 2022, Alg. 1 first-order): x_next = x + (x − D)/σ·(σ_next − σ)."""

    defaults = dict(timestep_spacing="linspace")

    def step(
        self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.float()
        denoised = denoised_from(model_output, x, sigma, self.config.prediction_type)
        d = (x - denoised) / sigma
        return (x + d * (sigma_next - sigma)).to(model_output.dtype)
