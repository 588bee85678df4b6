"""Linear multistep (LMS) sampling on the probability-flow ODE in σ: Karras et al. 2022 (arXiv:2206.00364)
§3 / k-diffusion `sample_lms`: x_next = x + Σ_j c_j·d_{k−j}, with c_j = ∫_{σ_k}^{σ_{k+1}} ℓ_j(τ) dτ and ℓ_j the
Lagrange basis polynomials through the last (up to 4) σ's — an Adams–Bashforth method on a non-uniform grid.

Equal step for step to diffusers 0.42.1 LMSDiscreteScheduler (order 4). We integrate the cubic ℓ_j exactly;
diffusers integrates it numerically (scipy quad) in float32, which differs by ~1e-7 relative.
"""

import numpy as np
import torch

from .base import SigmaScheduler
from .schedule import SchedulerConfig, denoised_from

LMS_ORDER = 4


def lms_coefficient(sigmas: np.ndarray, k: int, order: int, j: int) -> float:
    """∫_{σ_k}^{σ_{k+1}} ℓ_j(τ) dτ, ℓ_j the Lagrange basis polynomial through σ_k, …, σ_{k−order+1} that is 1
    at σ_{k−j}."""
    nodes = sigmas[k - np.arange(order)].astype(np.float64)
    others = np.delete(nodes, j)
    basis = np.atleast_1d(np.poly(others)) / np.prod(nodes[j] - others)  # coefficients of ℓ_j, highest power first
    antiderivative = np.polyint(basis)
    return float(np.polyval(antiderivative, sigmas[k + 1]) - np.polyval(antiderivative, sigmas[k]))


class LMS(SigmaScheduler):
    """LMS (k-diffusion `sample_lms`): 4th-order linear multistep on d = (x − D)/σ."""

    defaults = dict(timestep_spacing="linspace")

    def __init__(self, config: SchedulerConfig, num_inference_steps: int, strength: float = 1.0):
        super().__init__(config, num_inference_steps, strength)
        # the coefficients reach back before the first kept call, as diffusers': the σ's of the whole schedule
        self.all_sigmas = self.schedule(num_inference_steps)[1]
        self.derivatives = []  # d of the last LMS_ORDER steps, oldest first

    def step(
        self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        sigma = self.sigmas[i]
        denoised = denoised_from(model_output, x, sigma, self.config.prediction_type)
        self.derivatives = (self.derivatives + [(x - denoised) / sigma])[-LMS_ORDER:]
        # diffusers counts the order from the start of the full schedule, so with strength < 1 the first steps
        # use high-order coefficients with fewer derivatives (the sum stops at the shorter list); we do the same.
        k = self.begin + i
        order = min(k + 1, LMS_ORDER)
        coefficients = [lms_coefficient(self.all_sigmas, k, order, j) for j in range(order)]
        return x + sum(c * d for c, d in zip(coefficients, reversed(self.derivatives), strict=False))
