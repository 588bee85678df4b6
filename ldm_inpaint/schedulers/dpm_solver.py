"""DPM-Solver++(2M) and SDE-DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models" (arXiv:2211.01095), Algorithm 2 (multistep, data prediction, 2nd order by the
midpoint rule of eq. 13), and its SDE form (Lu et al. / Gonzalez et al. 2023 "SEEDS", the variant in diffusers
and k-diffusion `sample_dpmpp_2m_sde`); both in λ = log(α_t/σ_t) time, α_t = √ᾱ, σ_t = √(1 − ᾱ).

Equal step for step to diffusers 0.42.1 DPMSolverMultistepScheduler (algorithm_type "dpmsolver++" or
"sde-dpmsolver++", solver_type "midpoint", solver_order ≤ 2, final_sigmas_type "zero"): the first step and,
as σ = 0 ends the schedule, the last step are first order.
"""

import numpy as np
import torch

from .base import MultistepScheduler
from .schedule import (
    SchedulerConfig,
    alphas_cumprod,
    multistep_sigma_schedule,
    predict_x0_eps,
    randn_like,
    vp_alpha_sigma,
)


def log_snr(alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """λ_t = log(α_t/σ_t)."""
    return torch.log(alpha_t) - torch.log(sigma_t)


class DPMSolverMultistep(MultistepScheduler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), optionally with the SDE noise term (`sde-dpmsolver++`)."""

    defaults = dict(timestep_spacing="linspace", solver_type="midpoint")

    def __init__(self, config: SchedulerConfig, num_inference_steps: int, strength: float = 1.0):
        super().__init__(config, num_inference_steps, strength)
        self.denoised_prev = None  # the x_0 prediction of the previous step

    def schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        round_karras = self.config.beta_schedule != "squaredcos_cap_v2"  # diffusers truncates these instead
        return multistep_sigma_schedule(self.config, alphas_cumprod(self.config), n, round_karras)

    def step(
        self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        alpha_s, sigma_s = vp_alpha_sigma(self.sigmas[i])
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas[i + 1])
        denoised, _ = predict_x0_eps(model_output, x, alpha_s, sigma_s, self.config.prediction_type)
        sde = self.config.algorithm_type == "sde-dpmsolver++"
        noise = randn_like(model_output, generator, torch.float32) if sde else None  # drawn on every step
        x = x.float()
        h = log_snr(alpha_t, sigma_t) - log_snr(alpha_s, sigma_s)
        first_order = i == 0 or i == len(self.timesteps) - 1 or self.config.solver_order == 1
        if first_order:  # DPM-Solver++1 (= DDIM): the same update without the D1 term
            D1 = 0
        else:  # eq. 13: the finite difference of x_0 predictions over the previous step, r = h_prev/h
            alpha_r, sigma_r = vp_alpha_sigma(self.sigmas[i - 1])
            r = (log_snr(alpha_s, sigma_s) - log_snr(alpha_r, sigma_r)) / h
            D1 = (1.0 / r) * (denoised - self.denoised_prev)
        self.denoised_prev = denoised
        if sde:  # x_t = σ_t/σ_s·e^{−h}·x + α_t(1 − e^{−2h})(D0 + D1/2) + σ_t·√(1 − e^{−2h})·z
            c = alpha_t * (1 - torch.exp(-2.0 * h))
            x = (
                (sigma_t / sigma_s * torch.exp(-h)) * x
                + c * denoised
                + 0.5 * c * D1
                + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
            )
        else:  # Alg. 2: x_t = σ_t/σ_s·x − α_t(e^{−h} − 1)(D0 + D1/2)
            c = alpha_t * (torch.exp(-h) - 1.0)
            x = (sigma_t / sigma_s) * x - c * denoised - 0.5 * c * D1
        return x.to(model_output.dtype)
