"""What the schedulers of one kind share, so that each method's file is its `step`.

Every scheduler is built for one run: `schedule(n)` gives the timestep (and σ) of every model call of n inference
steps, and the constructor keeps the calls that img2img/inpainting strength keeps. The kinds differ in what the
sample x is, and so in the initial noise, the model's input and `add_noise`:

  AlphaBarScheduler   DDPM, DDIM, PNDM      x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε at integer timesteps t
  SigmaScheduler      Euler, Euler a, Heun, LMS   x = x_0 + σ·ε (k-diffusion's form); the model sees x/√(σ² + 1)
  MultistepScheduler  DPM-Solver, UniPC     stepped in σ, but x is x_t = α_t·x_0 + σ_t·ε as for the first kind

Only the σ kinds have `sigmas` (one longer than `timesteps`: the final σ = 0).
"""

import numpy as np
import torch

from .schedule import (
    SchedulerConfig,
    add_noise_at,
    alphas_cumprod,
    first_kept_step,
    integer_timesteps,
    denoised_from,
    multistep_sigma_schedule,
    predict_x0_eps,
    sigma_schedule,
    ve_init_noise_sigma,
    vp_alpha_sigma,
)


class AlphaBarScheduler:
    """x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε (DDPM eq. 4), ᾱ indexed by integer timesteps; the initial noise is plain ε
    and the model sees x_t as it is."""

    model_calls_per_step = 1
    init_noise_sigma = 1.0

    def __init__(self, config: SchedulerConfig, num_inference_steps: int, strength: float = 1.0):
        self.config = config
        self.alpha_bar = alphas_cumprod(config)
        self.begin = self.model_calls_per_step * first_kept_step(num_inference_steps, strength,
                                                                 config.num_train_timesteps)  # first kept call
        self.timesteps = torch.from_numpy(self.schedule(num_inference_steps))[self.begin :]

    def schedule(self, n: int) -> np.ndarray:
        """The timestep of every model call of n steps (int64), before strength cuts it."""
        return integer_timesteps(self.config, n)

    def alpha_bar_prev(self, t_prev: int) -> torch.Tensor:
        """ᾱ at the timestep a step ends on; past t = 0, 1 (clean) or, as SD's config asks, ᾱ_0 (set_alpha_to_one)."""
        if t_prev >= 0:
            return self.alpha_bar[t_prev]
        return torch.tensor(1.0) if self.config.set_alpha_to_one else self.alpha_bar[0]

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return add_noise_at(x0, noise, self.alpha_bar, self.timesteps, i)

    def predicted_x0(self, model_output: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """The clean sample the model output implies at call i (read-only: no state changes)."""
        a = self.alpha_bar[self.timesteps[i]]
        return predict_x0_eps(model_output, x, a.sqrt().to(x), (1 - a).sqrt().to(x), self.config.prediction_type)[0]


class SigmaScheduler:
    """x = x_0 + σ·ε at noise level σ = √((1 − ᾱ)/ᾱ) (Karras et al. 2022): the initial noise is scaled by about
    σ_max and the model sees the variance-preserving x/√(σ² + 1)."""

    model_calls_per_step = 1

    def __init__(self, config: SchedulerConfig, num_inference_steps: int, strength: float = 1.0):
        self.config = config
        self.begin = self.model_calls_per_step * first_kept_step(num_inference_steps, strength,
                                                                 config.num_train_timesteps)  # first kept call
        timesteps, sigmas = (torch.from_numpy(a) for a in self.schedule(num_inference_steps))
        self.timesteps = timesteps[self.begin :]
        self.sigmas = sigmas[self.begin :]
        self.init_noise_sigma = self.initial_noise_sigma(sigmas)

    def schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, σ's) of every model call of n steps, before strength cuts them; float32, σ's one longer."""
        return sigma_schedule(self.config, alphas_cumprod(self.config), n)

    def initial_noise_sigma(self, sigmas: torch.Tensor) -> float:
        """The scale of the initial noise, from the σ's of the whole schedule (strength does not change it)."""
        return ve_init_noise_sigma(sigmas, self.config.timestep_spacing, self.config.conventions)

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x / (self.sigmas[i] ** 2 + 1) ** 0.5

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return x0 + noise * self.sigmas.to(x0)[i]

    def predicted_x0(self, model_output: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """The clean sample the model output implies at call i (read-only: no state changes)."""
        return denoised_from(model_output, x, self.sigmas.to(x)[i], self.config.prediction_type)


class MultistepScheduler(SigmaScheduler):
    """Stepped in σ on diffusers' multistep schedule (integer timesteps), but the sample is the variance-preserving
    x_t = α_t·x_0 + σ_t·ε, α_t = 1/√(σ² + 1), σ_t = σ·α_t: plain initial noise, seen by the model as it is."""

    def schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return multistep_sigma_schedule(self.config, alphas_cumprod(self.config), n, round_karras=True)

    def initial_noise_sigma(self, sigmas: torch.Tensor) -> float:
        return 1.0

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas.to(x0)[i])
        return alpha_t * x0 + sigma_t * noise

    def predicted_x0(self, model_output: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas.to(x)[i])
        return predict_x0_eps(model_output, x, alpha_t, sigma_t, self.config.prediction_type)[0]
