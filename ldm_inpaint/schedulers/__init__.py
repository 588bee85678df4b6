"""Noise schedulers, step for step equal to diffusers' for the same config, step count, strength and generator.

    s = create("dpmpp_2m_karras", scheduler_config, num_inference_steps=30, strength=1.0)
    x = noise * s.init_noise_sigma
    for i, t in enumerate(s.timesteps):
        x = s.step(model(s.scale_model_input(x, i), t), i, x, generator)

Every scheduler is a small class of one form: built for one run (it may keep that run's multistep history),
with `timesteps` (already cut by strength), `init_noise_sigma`, `scale_model_input(x, i)`, `step(model_output,
i, x, generator)`, `add_noise(x0, noise, i)` and `predicted_x0(model_output, i, x)`, where i indexes the model calls (`model_calls_per_step` per
inference step: 2 for Heun). Schedule math is in schedule.py; what the schedulers of one kind (ᾱ-indexed,
σ-based, multistep) share, in base.py, so that each method's file is mostly its `step`.
"""

from .ddim import DDIM
from .ddpm import DDPM
from .dpm_solver import DPMSolverMultistep
from .euler import Euler
from .euler_ancestral import EulerAncestral
from .heun import Heun
from .lms import LMS
from .pndm import PNDM
from .schedule import SchedulerConfig
from .unipc import UniPC

# name → (class, config fields that the name implies on top of the diffusers config)
KARRAS = {"use_karras_sigmas": True}
SCHEDULERS = {
    "ddpm": (DDPM, {}),
    "ddim": (DDIM, {}),
    "pndm": (PNDM, {}),
    "lms": (LMS, {}),
    "lms_karras": (LMS, KARRAS),
    "euler": (Euler, {}),
    "euler_karras": (Euler, KARRAS),
    "euler_a": (EulerAncestral, {}),
    "heun": (Heun, {}),
    "dpmpp_2m": (DPMSolverMultistep, {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_karras": (DPMSolverMultistep, {"algorithm_type": "dpmsolver++", **KARRAS}),
    "dpmpp_2m_sde": (DPMSolverMultistep, {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": (DPMSolverMultistep, {"algorithm_type": "sde-dpmsolver++", **KARRAS}),
    "unipc": (UniPC, {}),
}

# a checkpoint's scheduler_config.json names a diffusers class; its own fields then decide the variant
# (algorithm_type, use_karras_sigmas, …), so these map to classes, not to names that imply fields
DIFFUSERS_CLASSES = {
    "DDPMScheduler": DDPM,
    "DDIMScheduler": DDIM,
    "PNDMScheduler": PNDM,
    "LMSDiscreteScheduler": LMS,
    "EulerDiscreteScheduler": Euler,
    "EulerAncestralDiscreteScheduler": EulerAncestral,
    "HeunDiscreteScheduler": Heun,
    "DPMSolverMultistepScheduler": DPMSolverMultistep,
    "UniPCMultistepScheduler": UniPC,
}


def from_checkpoint(scheduler_config: dict):
    """The scheduler class that a diffusers scheduler_config.json asks for."""
    name = scheduler_config.get("_class_name")
    if name not in DIFFUSERS_CLASSES:
        raise ValueError(f"the checkpoint's scheduler {name!r} is not supported; pass scheduler= one of "
                         f"{', '.join(available())}")
    return DIFFUSERS_CLASSES[name]


def available() -> list[str]:
    return sorted(SCHEDULERS)


def create(spec, scheduler_config: dict, num_inference_steps: int, strength: float = 1.0,
           conventions: str = "diffusers", **overrides):
    """A fresh scheduler for one sampling run.

    Args:
        spec: a name from `available()`, or a scheduler class (any callable taking (config, n, strength)).
        scheduler_config: a diffusers scheduler_config.json dict; its `_class_name` is ignored. Fields it lacks
            take the diffusers class defaults of the chosen method, as `Class.from_config` would.
        num_inference_steps: the number of inference steps n before strength is applied.
        strength: img2img/inpainting strength in (0, 1]: only the last int(n·strength) steps are run.
        conventions: "diffusers", or "original" for the schedules of the code the checkpoints were released
            with where they differ (docs/parity.md): DDIM runs ldm's timesteps (n = 7 runs 8 steps); Euler,
            Euler a, Heun and LMS run sgm's truncated timesteps, whatever the spacing, and start from
            ε·√(σ_max² + 1) (Karras σ's are refused); the other methods are unchanged. Strength skips the
            first n − int(n·strength) steps of these timesteps, as diffusers does of its own.
        overrides: config fields to replace, e.g. timestep_spacing="trailing", eta=0.3.
    """
    if isinstance(spec, str):
        if spec not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {spec!r}; available: {', '.join(available())}")
        cls, implied = SCHEDULERS[spec]
    else:
        cls, implied = spec, {}
    config = SchedulerConfig.from_diffusers(
        {**getattr(cls, "defaults", {}), **scheduler_config, **implied}, conventions, **overrides
    )
    return cls(config, num_inference_steps, strength)
