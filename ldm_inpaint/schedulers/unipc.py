"""UniPC: Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models" (arXiv:2302.04867), Algorithm 1 (UniP-p multistep predictor) and Algorithm 2 (UniC corrector), data
prediction form, B(h) = e^h − 1 ("bh2"), in λ = log(α_t/σ_t) time.

Equal step for step to diffusers 0.42.1 UniPCMultistepScheduler (predict_x0, solver_order ≤ 2, solver_type bh2,
lower_order_final, no disabled correctors, final_sigmas_type "zero"): each call first corrects the sample the
previous predictor made, using the new model output, then predicts the next one; orders warm up from 1 and drop
to 1 on the last step. (With final σ = 0, diffusers' bh1 and lower_order_final=False give NaN/inf on that step.)
"""

import torch

from .dpm_solver import log_snr
from .base import MultistepScheduler
from .schedule import SchedulerConfig, predict_x0_eps, vp_alpha_sigma


class UniPC(MultistepScheduler):
    """UniPC-2 with B(h) = e^h − 1 (Zhao et al. 2023, Algs. 1–2)."""

    defaults = dict(timestep_spacing="linspace", solver_type="bh2")

    def __init__(self, config: SchedulerConfig, num_inference_steps: int, strength: float = 1.0):
        if not config.predict_x0:
            raise ValueError("unipc: only predict_x0=True (the data-prediction form) is supported")
        if config.solver_type == "bh1" or not config.lower_order_final:  # diffusers maps other solver_types to bh2
            raise ValueError("unipc: solver_type bh1 and lower_order_final=False are not supported (NaN at σ = 0)")
        super().__init__(config, num_inference_steps, strength)
        self.denoised = []  # the x_0 predictions of the last solver_order calls, oldest first
        self.x_last, self.order_last = None, None  # where the last predictor started, and its order

    def step(
        self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas[i])
        denoised, _ = predict_x0_eps(model_output, x, alpha_t, sigma_t, self.config.prediction_type)
        if i > 0:
            x = self.correct(i, denoised)
        self.denoised = (self.denoised + [denoised])[-self.config.solver_order :]
        order = self.config.solver_order
        if self.config.lower_order_final:
            order = min(order, len(self.timesteps) - i)
        order = min(order, i + 1)  # warm-up: no history yet
        self.x_last, self.order_last = x, order
        return self.predict(i, x, order)

    def log_snr(self, j: int) -> torch.Tensor:
        """λ at σ[j]."""
        return log_snr(*vp_alpha_sigma(self.sigmas[j]))

    def predict(self, i: int, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP (Alg. 1) from σ[i] to σ[i+1]: the DPM-Solver++ 1st-order step, plus for order 2 the finite
        difference D_1 of the last two x_0 predictions with its single weight ρ = 1/2."""
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas[i + 1])
        sigma_s = vp_alpha_sigma(self.sigmas[i])[1]
        h = self.log_snr(i + 1) - self.log_snr(i)
        B_h = torch.expm1(-h)  # B(−h) = e^{−h} − 1 (bh2), which is also h·φ_1(−h)
        m0 = self.denoised[-1]
        x_t = sigma_t / sigma_s * x - alpha_t * B_h * m0
        if order == 2:
            D1 = (self.denoised[-2] - m0) / ((self.log_snr(i - 1) - self.log_snr(i)) / h)
            x_t = x_t - alpha_t * B_h * (0.5 * D1)
        return x_t.to(x.dtype)

    def correct(self, i: int, denoised_t: torch.Tensor) -> torch.Tensor:
        """UniC (Alg. 2): redo the last step, from x_last to σ[i], with the new x_0 prediction at σ[i] as well."""
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas[i])
        sigma_s = vp_alpha_sigma(self.sigmas[i - 1])[1]
        h = self.log_snr(i) - self.log_snr(i - 1)
        B_h = torch.expm1(-h)
        m0, x = self.denoised[-1], self.x_last
        correction = denoised_t - m0
        if self.order_last == 1:
            correction = 0.5 * correction
        else:  # weights ρ from R·ρ = b, R = [[1, 1], [r_1, 1]], b_k = k!·hφ_{k+1}(−h)/B(−h) (φ_k recursively)
            r1 = (self.log_snr(i - 2) - self.log_snr(i - 1)) / h
            h_phi_2 = B_h / -h - 1
            h_phi_3 = h_phi_2 / -h - 1 / 2
            one = torch.ones(())
            R = torch.stack([torch.stack([one, one]), torch.stack([r1, one])])
            rho_prev, rho_t = torch.linalg.solve(R, torch.stack([h_phi_2 / B_h, h_phi_3 * 2 / B_h])).to(x.dtype)
            correction = rho_prev * ((self.denoised[-2] - m0) / r1) + rho_t * correction
        x_c = sigma_t / sigma_s * x - alpha_t * B_h * m0
        return (x_c - alpha_t * B_h * correction).to(x.dtype)
