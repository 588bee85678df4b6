"""Noise-schedule math shared by every sampler, as small pure functions, plus the scheduler config.

Everything here reproduces diffusers' recipes operation for operation (float32 betas and ᾱ, numpy spacing and
interpolation), so our timesteps are bit-identical to diffusers' and our σ's equal theirs.

References:
  DDPM, Ho et al. 2020 (arXiv:2006.11239): β_t, ᾱ_t = Π(1 − β_s), x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε (eq. 4).
  Improved DDPM, Nichol & Dhariwal 2021 (arXiv:2102.09672) eq. 17: the "squaredcos_cap_v2" schedule.
  Lin et al. 2023 (arXiv:2305.08891) Table 2: the "linspace", "leading" and "trailing" timestep spacings.
  Karras et al. 2022 (arXiv:2206.00364) eq. 5: σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, ρ = 7.
  Salimans & Ho 2022 (arXiv:2202.00512) §4: v = √ᾱ·ε − √(1 − ᾱ)·x_0.

conventions="original" swaps in the schedules of the code the checkpoints were released with where they differ
from diffusers' (ldm's DDIM timesteps, sgm's σ timesteps and initial noise; docs/parity.md).
"""

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..family import CONVENTIONS
from ..noise import Generator, randn

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
KARRAS_RHO = 7.0


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields of a diffusers scheduler_config.json that we implement. Defaults are DDIMScheduler's; each
    scheduler class lists in `defaults` its diffusers class defaults for the fields whose defaults differ between
    classes (a config that lacks such a field gets the chosen class's default, as with `Class.from_config`)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True  # DDIM, PNDM: ᾱ after the last step is 1, else ᾱ[0]
    clip_sample: bool = True  # DDPM, DDIM, Heun: clamp the x_0 prediction to ±clip_sample_range
    clip_sample_range: float = 1.0
    skip_prk_steps: bool = False  # PNDM: only the PLMS part (we implement nothing else)
    eta: float = 0.0  # DDIM: η of eq. 16 (0 = deterministic DDIM, 1 = DDPM-like)
    use_karras_sigmas: bool = False  # σ-based schedulers: Karras et al. eq. 5 instead of the trained σ's
    algorithm_type: str = "dpmsolver++"  # DPM-Solver: "dpmsolver++" (ODE) or "sde-dpmsolver++"
    solver_order: int = 2  # DPM-Solver, UniPC
    solver_type: str = "midpoint"  # DPM-Solver "midpoint"; UniPC "bh1" / "bh2"
    lower_order_final: bool = True  # DPM-Solver, UniPC: lower orders on the last steps of short schedules
    predict_x0: bool = True  # UniPC: the data-prediction (x_0) form
    # Not a diffusers field (a scheduler_config.json cannot set it): "original" reproduces the release code's
    # schedules where they differ from diffusers' (ldm_ddim_timesteps, sgm_timesteps, ve_init_noise_sigma)
    conventions: str = "diffusers"

    @classmethod
    def from_diffusers(cls, d: dict, conventions: str = "diffusers", **overrides) -> "SchedulerConfig":
        """Reads a diffusers scheduler_config.json dict; `overrides` replace its fields. Raises ValueError for
        keys we do not know and for settings we do not implement, rather than silently ignoring them."""
        d = {**d, **overrides}
        fields = {f.name for f in dataclasses.fields(cls)} - {"conventions"}
        for key, value in d.items():
            if key in IGNORED_KEYS or key in fields:
                continue
            if key not in NEUTRAL_VALUES:
                raise ValueError(f"unknown scheduler config key {key!r}")
            if value not in NEUTRAL_VALUES[key]:
                raise ValueError(
                    f"scheduler config {key}={value!r} is not supported; supported: {NEUTRAL_VALUES[key]!r}"
                )
        kwargs = {k: v for k, v in d.items() if k in fields}
        if kwargs.get("trained_betas") is not None:
            kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
        return cls(**kwargs, conventions=conventions)

    @classmethod
    def keys(cls) -> set[str]:
        """Every key a scheduler_config.json (or a keyword override) may hold."""
        return {f.name for f in dataclasses.fields(cls)} - {"conventions"} | IGNORED_KEYS | set(NEUTRAL_VALUES)

    def __post_init__(self) -> None:
        choices = {
            "beta_schedule": BETA_SCHEDULES,
            "timestep_spacing": SPACINGS,
            "prediction_type": PREDICTION_TYPES,
            "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
            "solver_order": (1, 2),
            "solver_type": ("midpoint", "logrho", "bh1", "bh2"),  # each solver maps the others' names to its own
            "conventions": CONVENTIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"scheduler config {name}={getattr(self, name)!r} is not supported; use one of {allowed}"
                )


# Keys that cannot change our result: bookkeeping, and thresholding parameters (thresholding itself is refused).
IGNORED_KEYS = {
    "_class_name",
    "_diffusers_version",
    "_use_default_values",
    "dynamic_thresholding_ratio",
    "sample_max_value",
}

# Keys of diffusers schedulers whose features we do not implement: accepted only at these (default) values.
NEUTRAL_VALUES = {
    "thresholding": (False,),
    "rescale_betas_zero_snr": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "euler_at_final": (False,),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    "final_sigmas_type": ("zero",),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "lambda_min_clipped": (-math.inf,),
    "variance_type": (None, "fixed_small"),
    "disable_corrector": ([],),
    "solver_p": (None,),
    "flow_shift": (1.0,),
    "time_shift_type": ("exponential",),
    "shift_terminal": (None,),
}


# --- ᾱ schedule -------------------------------------------------------------------------------------------


def betas(config: SchedulerConfig) -> torch.Tensor:
    """β_1..β_T in float32, as diffusers computes them."""
    T = config.num_train_timesteps
    if config.trained_betas is not None:
        return torch.tensor(config.trained_betas, dtype=torch.float32)
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    if config.beta_schedule == "scaled_linear":  # linear in √β: the latent-diffusion schedule
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2

    def alpha_bar(t):  # "squaredcos_cap_v2": Improved DDPM eq. 17, β capped at 0.999
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=torch.float32
    )


def alphas_cumprod(config: SchedulerConfig) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 − β_s), float32, indexed by the training timestep t = 0..T−1."""
    return torch.cumprod(1.0 - betas(config), dim=0)


def spaced_timesteps(spacing: str, num_train_timesteps: int, n: int, steps_offset: int) -> np.ndarray:
    """n inference timesteps, descending, in float64 (linspace values are not rounded: the ᾱ schedulers round
    them, the σ schedulers interpolate σ between training steps). Lin et al. 2023 Table 2."""
    T = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(n) * (T // n))[::-1].astype(np.float64) + steps_offset
    timesteps = np.round(np.arange(T, 0, -T / n)) - 1  # "trailing"
    if len(timesteps) != n:  # float arange overshoots for some n, and diffusers would then step to t = −1
        raise ValueError(f"'trailing' spacing is broken in diffusers for num_inference_steps={n} (gives t = -1)")
    return timesteps


def first_kept_step(num_inference_steps: int, strength: float, num_train_timesteps: int) -> int:
    """Index of the first inference step that img2img/inpainting `strength` keeps (diffusers get_timesteps):
    strength 1 keeps all n steps, strength s keeps the last int(n·s)."""
    n = num_inference_steps
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}], got {n}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    kept = min(int(n * strength), n)
    if kept < 1:
        raise ValueError(f"strength {strength} with {n} inference steps leaves no step to run")
    return n - kept


def integer_timesteps(config: SchedulerConfig, n: int) -> np.ndarray:
    """The spaced timesteps rounded to the integers ᾱ is indexed by (DDPM, DDIM, PNDM), int64 as diffusers."""
    spaced = spaced_timesteps(config.timestep_spacing, config.num_train_timesteps, n, config.steps_offset)
    return np.round(spaced).astype(np.int64)


def ldm_ddim_timesteps(num_train_timesteps: int, n: int) -> np.ndarray:
    """The DDIM timesteps of the code SD 1.x was released with, descending, int64 (CompVis/runwayml ldm,
    ldm/modules/diffusionmodules/util.py `make_ddim_timesteps`, "uniform", as `DDIMSampler.make_schedule` calls
    it): every c-th training step from 0, c = T // n, each + 1. That is ⌈T/c⌉ steps, one or more beyond n when c
    does not divide T (n = 7: c = 142, 8 steps 995, 853, …, 1), where diffusers' "leading" spacing with
    steps_offset 1 stops at n (853, …, 1)."""
    T = num_train_timesteps
    timesteps = np.arange(0, T, T // n)[::-1] + 1
    if timesteps[0] >= T:  # c divides T − 1 (n = 3, 9, 27, 36, …): ldm indexes ᾱ at t = T and fails
        raise ValueError(f"the original DDIM cannot run num_inference_steps={n} (its first timestep would be {T}, "
                         f"past the schedule); use another step count or conventions='diffusers'")
    return timesteps.astype(np.int64)


def add_noise_at(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, timesteps: torch.Tensor,
                 i: int) -> torch.Tensor:
    """x0 noised to the level of model call i of an ᾱ-indexed schedule; after the last call, x0 itself."""
    return x0 if i == len(timesteps) else noise_to_level(x0, noise, alpha_bar, timesteps[i])


def noise_to_level(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, t) -> torch.Tensor:
    """x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε (DDPM eq. 4), with ᾱ cast to x_0's dtype first as diffusers does."""
    alpha_bar_t = alpha_bar.to(device=x0.device, dtype=x0.dtype)[t]
    return alpha_bar_t**0.5 * x0 + (1 - alpha_bar_t) ** 0.5 * noise


# --- σ schedule (σ = √((1 − ᾱ)/ᾱ), the noise level of x/√ᾱ) ---------------------------------------------------


def training_sigmas(alpha_bar: torch.Tensor) -> np.ndarray:
    """σ_t for every training timestep t (float32, ascending in t)."""
    return (((1 - alpha_bar) / alpha_bar) ** 0.5).numpy()


def sigmas_at(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """σ at (possibly fractional) timesteps, linear interpolation between training steps (float64)."""
    return np.interp(timesteps, np.arange(len(sigmas)), sigmas)


def karras_sigmas(sigma_max: float, sigma_min: float, n: int) -> np.ndarray:
    """Karras et al. eq. 5 (float64)."""
    ramp = np.linspace(0, 1, n)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / KARRAS_RHO), sigma_min ** (1 / KARRAS_RHO)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO


def sigma_to_t(sigmas: np.ndarray, training_sigmas: np.ndarray) -> np.ndarray:
    """The fractional timestep of each σ: linear interpolation in log σ between training steps."""
    log_sigmas = np.log(training_sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]  # (T, n)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def sgm_timesteps(num_train_timesteps: int, n: int) -> np.ndarray:
    """The timesteps of the code SDXL was released with, descending, float64 (Stability's sgm,
    sgm/modules/diffusionmodules/discretizer.py `LegacyDDPMDiscretization.get_sigmas` through
    `generate_roughly_equally_spaced_steps`): n points from T − 1 down in steps of (T − 1)/n, truncated to
    integers (n = 3: 999, 666, 333), whatever the config's spacing. diffusers' nearest spacing, "trailing", rounds
    round(T − k·T/n) − 1 instead (999, 666, 332); its SDXL configs' "leading" is another grid (751, …, 1 for 4).
    The UNet sees these integers: sgm's `DiscreteDenoiser` maps each σ back to its training index."""
    T = num_train_timesteps
    # numpy's float linspace, truncated: exact arithmetic would differ where a point falls on an integer (n = 99)
    return np.linspace(T - 1, 0, n, endpoint=False).astype(np.int64).astype(np.float64)


def sigma_schedule(config: SchedulerConfig, alpha_bar: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, σ's) of diffusers' Euler / LMS / Heun schedulers, both float32: σ interpolated at the spaced
    timesteps, or Karras σ's between the same end points (their timesteps then fractional), and a final σ = 0.
    conventions="original": σ at sgm's timesteps (`sgm_timesteps`), with its final σ = 0."""
    train = training_sigmas(alpha_bar)
    if config.conventions == "original":
        if config.use_karras_sigmas:
            raise ValueError("conventions='original' has no Karras σ's (sgm's EDMDiscretization is not reproduced); "
                             "use use_karras_sigmas=False or conventions='diffusers'")
        timesteps = sgm_timesteps(config.num_train_timesteps, n)
        sigmas = sigmas_at(timesteps, train)  # the training σ's themselves: the timesteps are integers
    else:
        timesteps = spaced_timesteps(config.timestep_spacing, config.num_train_timesteps, n, config.steps_offset)
        sigmas = sigmas_at(timesteps.astype(np.float32), train)
        if config.use_karras_sigmas:
            sigmas = karras_sigmas(sigmas[0].item(), sigmas[-1].item(), n)
            timesteps = sigma_to_t(sigmas, train)
    return timesteps.astype(np.float32), np.append(sigmas, 0.0).astype(np.float32)


def multistep_sigma_schedule(
    config: SchedulerConfig, alpha_bar: torch.Tensor, n: int, round_karras: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64, σ's float32 with a final σ = 0) of diffusers' DPM-Solver and UniPC schedulers: "leading"
    and "linspace" take the n largest of n + 1 spaced timesteps; Karras σ's span the whole training range and
    their timesteps are rounded when `round_karras` (and else truncated)."""
    T, train = config.num_train_timesteps, training_sigmas(alpha_bar)
    if config.timestep_spacing == "trailing":
        timesteps = spaced_timesteps("trailing", T, n, config.steps_offset)
    else:
        timesteps = np.round(spaced_timesteps(config.timestep_spacing, T, n + 1, config.steps_offset)[:-1])
    if config.use_karras_sigmas:
        sigmas = karras_sigmas(train[-1].item(), train[0].item(), n)
        timesteps = sigma_to_t(sigmas, train)
        if round_karras:
            timesteps = np.round(timesteps)
    else:
        sigmas = sigmas_at(timesteps, train)
    return timesteps.astype(np.int64), np.append(sigmas, 0.0).astype(np.float32)


def ve_init_noise_sigma(sigmas: torch.Tensor, spacing: str, conventions: str = "diffusers") -> float:
    """The scale of the initial noise for x = x_0 + σ·ε samplers. diffusers' rule: σ_max, except √(σ_max² + 1)
    for "leading" spacing. sgm's (conventions="original"; sgm/modules/diffusionmodules/sampling.py
    `BaseDiffusionSampler.prepare_sampling_loop`): √(σ_max² + 1) whatever the spacing, the standard deviation of
    x_0 + σ_max·ε for unit-variance x_0 (+0.23 % over σ_max = 14.61 of SD's β's)."""
    sigma_max = sigmas.max()
    if conventions == "diffusers" and spacing in ("linspace", "trailing"):
        return float(sigma_max)
    return float((sigma_max**2 + 1) ** 0.5)


# --- model output conversions ------------------------------------------------------------------------------------


def predict_x0_eps(model_output, x, alpha_t, sigma_t, prediction_type):
    """(x_0, ε) from the model output at x = α_t·x_0 + σ_t·ε, α_t = √ᾱ, σ_t = √(1 − ᾱ) (DDIM eq. 12; for v,
    Salimans & Ho §4)."""
    if prediction_type == "epsilon":
        return (x - sigma_t * model_output) / alpha_t, model_output
    if prediction_type == "v_prediction":
        return alpha_t * x - sigma_t * model_output, alpha_t * model_output + sigma_t * x
    x0 = model_output
    return x0, (x - alpha_t * x0) / sigma_t


def denoised_from(model_output, x, sigma, prediction_type):
    """x_0 from the model output at x = x_0 + σ·ε, the k-diffusion form (the model saw x/√(σ²+1))."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return model_output


def vp_alpha_sigma(sigma):
    """(α_t, σ_t) = (√ᾱ, √(1 − ᾱ)) of the variance-preserving x_t = α_t·x_0 + σ_t·ε at noise level σ."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


def randn_like(x: torch.Tensor, generator: Generator, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Gaussian noise of x's shape drawn as diffusers' randn_tensor draws it (one generator, or one per item)."""
    return randn(x.shape, generator, x.device, dtype or x.dtype)
