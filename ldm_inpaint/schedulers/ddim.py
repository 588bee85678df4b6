"""DDIM: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (arXiv:2010.02502), eqs. 12 and 16.

Equal step for step to diffusers 0.42.1 DDIMScheduler (src/diffusers/schedulers/scheduling_ddim.py); with
conventions="original", to ldm's `DDIMSampler` (its timesteps: `ldm_ddim_timesteps`).
"""

import numpy as np
import torch

from .base import AlphaBarScheduler
from .schedule import SchedulerConfig, ldm_ddim_timesteps, predict_x0_eps, randn_like


class DDIM(AlphaBarScheduler):
    """DDIM (Song et al. 2021): x_{t−1} = √ᾱ_prev·x̂_0 + √(1 − ᾱ_prev − σ_t²)·ε̂ + σ_t·z,
    σ_t = η·√((1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev))."""

    defaults = dict(timestep_spacing="leading", set_alpha_to_one=True, clip_sample=True)

    def __init__(self, config: SchedulerConfig, num_inference_steps: int, strength: float = 1.0):
        super().__init__(config, num_inference_steps, strength)
        # DDIM steps back by T // n whatever the spacing, as diffusers does (and ldm: its steps are T // n apart)
        self.step_size = config.num_train_timesteps // num_inference_steps

    def schedule(self, n: int) -> np.ndarray:
        if self.config.conventions == "original":
            return ldm_ddim_timesteps(self.config.num_train_timesteps, n)
        return super().schedule(n)

    def step(
        self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        t = int(self.timesteps[i])
        alpha_bar, alpha_bar_prev = self.alpha_bar[t], self.alpha_bar_prev(t - self.step_size)
        x0, eps = predict_x0_eps(
            model_output, x, alpha_bar**0.5, (1 - alpha_bar) ** 0.5, self.config.prediction_type
        )  # eq. 12 "predicted x_0"
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)  # eq. 16, σ_t²/η²
        std = self.config.eta * variance**0.5
        x_prev = alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev - std**2) ** 0.5 * eps  # eq. 12
        if self.config.eta > 0:
            x_prev = x_prev + std * randn_like(model_output, generator)
        return x_prev
