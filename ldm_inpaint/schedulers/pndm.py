"""PNDM's pseudo linear multistep (PLMS) sampler: Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
Models on Manifolds" (arXiv:2202.09778), transfer part eq. 9 and the linear multistep eq. 12.

Equal step for step to diffusers 0.42.1 PNDMScheduler with skip_prk_steps=True (the Runge-Kutta warm-up
steps of the paper are replaced by a 2nd-order warm-up: the first step is redone with the mean of two outputs).
"""

import numpy as np
import torch

from .base import AlphaBarScheduler
from .schedule import SchedulerConfig, predict_x0_eps


class PNDM(AlphaBarScheduler):
    """PLMS (Liu et al. 2022): 4th-order Adams–Bashforth on ε, stepped with the PNDM transfer φ of eq. 9."""

    defaults = dict(timestep_spacing="leading", set_alpha_to_one=False, skip_prk_steps=False)

    def __init__(self, config: SchedulerConfig, num_inference_steps: int, strength: float = 1.0):
        if not config.skip_prk_steps:
            raise ValueError("PNDM's Runge-Kutta steps are not implemented: set skip_prk_steps=True (PLMS only)")
        if config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"PNDM supports prediction_type epsilon and v_prediction, not {config.prediction_type!r}")
        super().__init__(config, num_inference_steps, strength)
        self.step_size = config.num_train_timesteps // num_inference_steps  # as DDIM's
        self.outputs = []  # the last model outputs, oldest first
        self.x_first = None

    def schedule(self, n: int) -> np.ndarray:
        timesteps = super().schedule(n)
        # The second timestep is run twice (n + 1 model calls): the warm-up step below needs two outputs.
        return np.concatenate([timesteps[:1], timesteps[1:2], timesteps[1:]])

    def step(
        self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        t = int(self.timesteps[i])
        t_prev = t - self.step_size
        e = self.outputs
        if i == 1:  # warm-up: redo the first step from its start with the mean of both outputs (Heun-like)
            t, t_prev = t + self.step_size, t
            model_output = (model_output + e[-1]) / 2
            x = self.x_first
        else:
            self.outputs = e = e[-3:] + [model_output]
            if i == 0:
                self.x_first = x
            elif len(e) == 2:
                model_output = (3 * e[-1] - e[-2]) / 2
            elif len(e) == 3:
                model_output = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
            else:  # eq. 12
                model_output = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        return self.transfer(x, t, t_prev, model_output)

    def transfer(self, x: torch.Tensor, t: int, t_prev: int, model_output: torch.Tensor) -> torch.Tensor:
        """φ(x_t, ε, t, t_prev) of eq. 9: the DDIM step written as one fraction."""
        alpha_bar, alpha_bar_prev = self.alpha_bar[t], self.alpha_bar_prev(t_prev)
        _, eps = predict_x0_eps(model_output, x, alpha_bar**0.5, (1 - alpha_bar) ** 0.5, self.config.prediction_type)
        denominator = alpha_bar * (1 - alpha_bar_prev) ** 0.5 + (alpha_bar * (1 - alpha_bar) * alpha_bar_prev) ** 0.5
        return (alpha_bar_prev / alpha_bar) ** 0.5 * x - (alpha_bar_prev - alpha_bar) * eps / denominator
