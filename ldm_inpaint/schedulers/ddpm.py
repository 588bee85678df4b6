"""DDPM ancestral sampling: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models"
(arXiv:2006.11239), posterior q(x_{t−1} | x_t, x_0) of eqs. 6–7 with the "fixed small" variance β̃_t.

Equal step for step to diffusers 0.42.1 DDPMScheduler (variance_type "fixed_small"), jumping between the spaced
timesteps: ᾱ_prev is taken at the next inference timestep.
"""

import torch

from .base import AlphaBarScheduler
from .schedule import predict_x0_eps, randn_like


class DDPM(AlphaBarScheduler):
    """DDPM (Ho et al. 2020): x_{t−1} = μ̃_t(x_t, x̂_0) + √β̃_t·z, eq. 7, z drawn from the generator while t > 0."""

    defaults = dict(timestep_spacing="leading", clip_sample=True)

    def step(
        self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        t = int(self.timesteps[i])
        alpha_bar = self.alpha_bar[t]
        alpha_bar_prev = self.alpha_bar[self.timesteps[i + 1]] if i + 1 < len(self.timesteps) else torch.tensor(1.0)
        alpha = alpha_bar / alpha_bar_prev  # α of this (possibly multi-step) jump
        beta = 1 - alpha
        x0, _ = predict_x0_eps(model_output, x, alpha_bar**0.5, (1 - alpha_bar) ** 0.5, self.config.prediction_type)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        # eq. 7: μ̃_t = √ᾱ_prev·β_t/(1 − ᾱ_t)·x_0 + √α_t·(1 − ᾱ_prev)/(1 − ᾱ_t)·x_t
        x_prev = (alpha_bar_prev**0.5 * beta) / (1 - alpha_bar) * x0 + alpha**0.5 * (1 - alpha_bar_prev) / (
            1 - alpha_bar
        ) * x
        if t > 0:
            variance = torch.clamp((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, min=1e-20)  # β̃_t
            x_prev = x_prev + variance**0.5 * randn_like(model_output, generator)
        return x_prev
