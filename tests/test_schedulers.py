"""Step-for-step parity of ldm_inpaint.schedulers with the diffusers scheduler classes.

Both sides start from the same sample and receive the same seeded random model outputs (and, for stochastic
methods, generators with the same seed); the diffusers side is driven as the img2img/inpainting pipelines drive
it (set_timesteps, strength cut with set_begin_index, scale_model_input, step, add_noise). Claims:
timesteps torch.equal, init_noise_sigma equal, every scaled input, intermediate sample and add_noise result
within |ours − theirs|_max ≤ 1e-6·|theirs|_max + 1e-10 (5e-6 for LMS, see RTOL_BY_NAME). In practice every
method but LMS is bit-identical.
"""

import json
from pathlib import Path

import diffusers
import pytest
import torch

from ldm_inpaint import schedulers

# diffusers' own numpy-2 deprecation noise (torch tensors passed to np.array(copy=False))
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CONFIGS = Path(__file__).resolve().parents[1] / "ldm_inpaint" / "configs"
SD15_INPAINT = json.loads((CONFIGS / "sd15-inpainting" / "scheduler.json").read_text())  # DDIM, no spacing key
SDXL_INPAINT = json.loads((CONFIGS / "sdxl-inpainting" / "scheduler.json").read_text())  # Euler, "leading"
RTOL, ATOL = 1e-6, 1e-10
# diffusers' LMS integrates its coefficients with scipy.quad over a float32 integrand (~1e-7 relative noise per
# coefficient); ours are exact, so LMS samples drift apart by ~1e-6 relative over 50 steps (worst seen 1.1e-6).
RTOL_BY_NAME = {"lms": 5e-6, "lms_karras": 5e-6}
SHAPE = (1, 4, 8, 8)


def diffusers_equivalent(name: str) -> tuple[str, dict]:
    """(diffusers class name, from_config kwargs) of one of our names, read from the package's one table: the
    class whose checkpoints our method of that name serves, and the config fields the name implies. The parity
    tests then check that class against ours; test_each_name_means_what_it_says checks the table itself."""
    cls, implied = schedulers.SCHEDULERS[name]
    (theirs,) = [theirs for theirs, ours in schedulers.DIFFUSERS_CLASSES.items() if ours is cls]
    return theirs, implied


# diffusers' LMSDiscreteScheduler integrates its coefficients with scipy, which the project does not depend on.
NEEDS_SCIPY = pytest.mark.skipif(not diffusers.utils.is_scipy_available(), reason="diffusers' LMS needs scipy")
NAMES = [pytest.param(n, marks=NEEDS_SCIPY) if n.startswith("lms") else n for n in schedulers.available()]


WORST = {}  # name → largest |ours − theirs|_max / |theirs|_max seen; read it after an in-process pytest.main()


def assert_close(ours, theirs, what, name):
    diff, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    WORST[name] = max(WORST.get(name, 0.0), diff / max(scale, 1e-30))
    bound = RTOL_BY_NAME.get(name, RTOL) * scale + ATOL
    assert diff <= bound, f"{name} {what}: max |ours - theirs| = {diff:.3g} > {bound:.3g}"


def check_parity(name, config, n, strength, dtype=torch.float32, **overrides):
    """Runs ours and diffusers side by side; asserts every step agrees."""
    cls_name, implied = diffusers_equivalent(name)
    eta = overrides.pop("eta", None)  # a DDIM step argument in diffusers, a config field for us
    theirs = getattr(diffusers, cls_name).from_config(config, **implied, **overrides)
    ours = schedulers.create(name, config, n, strength, **overrides, **({} if eta is None else {"eta": eta}))

    theirs.set_timesteps(n)
    t_start = max(n - min(int(n * strength), n), 0) * theirs.order  # diffusers get_timesteps
    timesteps = theirs.timesteps[t_start:]
    if hasattr(theirs, "set_begin_index"):
        theirs.set_begin_index(t_start)
    assert ours.timesteps.dtype == timesteps.dtype and torch.equal(ours.timesteps, timesteps), (
        ours.timesteps,
        timesteps,
    )
    assert isinstance(ours.init_noise_sigma, float) and ours.init_noise_sigma == float(theirs.init_noise_sigma)

    seeds = torch.Generator().manual_seed(n)
    x0, noise = torch.randn(SHAPE, generator=seeds, dtype=dtype), torch.randn(SHAPE, generator=seeds, dtype=dtype)
    model_outputs = [torch.randn(SHAPE, generator=seeds, dtype=dtype) for _ in timesteps]
    if strength == 1.0:
        x, x_theirs = noise * ours.init_noise_sigma, noise * theirs.init_noise_sigma
        assert_close(x, x_theirs, "initial noise", name)
    else:
        x, x_theirs = ours.add_noise(x0, noise, 0), theirs.add_noise(x0, noise, timesteps[:1])
        assert_close(x, x_theirs, "add_noise at step 0", name)

    step_kwargs = {} if eta is None else {"eta": eta}
    generator, generator_theirs = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    if "generator" in theirs.step.__code__.co_varnames:
        step_kwargs["generator"] = generator_theirs
    for i, (t, model_output) in enumerate(zip(timesteps, model_outputs, strict=True)):
        assert_close(ours.scale_model_input(x, i), theirs.scale_model_input(x_theirs, t), f"scaled input {i}", name)
        x = ours.step(model_output, i, x, generator)
        x_theirs = theirs.step(model_output, t, x_theirs, **step_kwargs).prev_sample
        assert x.dtype == x_theirs.dtype
        assert_close(x, x_theirs, f"sample after step {i} (t={t.item()})", name)
        if i + 1 < len(timesteps):  # the 4-channel inpainting loop re-noises the known region this way
            assert_close(
                ours.add_noise(x0, noise, i + 1),
                theirs.add_noise(x0, noise, timesteps[i + 1 : i + 2]),
                f"add_noise {i + 1}",
                name,
            )
    assert torch.equal(ours.add_noise(x0, noise, len(timesteps)), x0)


def check_parity_or_refusal(name, config, n, strength, **overrides):
    if int(n * strength) < 1:  # no step left: diffusers' pipelines refuse it too
        with pytest.raises(ValueError, match="no step"):
            schedulers.create(name, config, n, strength, **overrides)
    else:
        check_parity(name, config, n, strength, **overrides)


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("n", [1, 2, 7, 25, 50])
@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", NAMES)
def test_scheduler_matches_diffusers_sd15_config(name, prediction_type, spacing, n, strength):
    overrides = {"prediction_type": prediction_type} | ({} if spacing is None else {"timestep_spacing": spacing})
    check_parity_or_refusal(name, SD15_INPAINT, n, strength, **overrides)


@pytest.mark.parametrize("strength", [1.0, 0.9999, 0.6])
@pytest.mark.parametrize("n", [1, 7, 50])
@pytest.mark.parametrize("name", NAMES)
def test_scheduler_matches_diffusers_sdxl_config(name, n, strength):
    check_parity_or_refusal(name, SDXL_INPAINT, n, strength)


@pytest.mark.parametrize("n", [2, 25])
@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta_matches_diffusers(eta, n):
    check_parity("ddim", SD15_INPAINT, n, 1.0, eta=eta)


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("pndm", "euler_a")])
def test_sample_prediction_matches_diffusers(name, strength):
    check_parity(name, SD15_INPAINT, 7, strength, prediction_type="sample")


@pytest.mark.parametrize("name", ["pndm", "euler_a"])
def test_sample_prediction_refused_where_diffusers_refuses(name):
    with pytest.raises(ValueError, match="prediction_type"):
        schedulers.create(name, SD15_INPAINT, 10, prediction_type="sample")


@pytest.mark.parametrize("name", NAMES)
def test_float16_matches_diffusers(name):
    check_parity(name, SD15_INPAINT, 7, 0.6, dtype=torch.float16)


VARIANTS = [
    ("ddim", {"set_alpha_to_one": True, "steps_offset": 0}),
    ("ddim", {"clip_sample": True, "clip_sample_range": 0.5}),
    ("ddim", {"beta_schedule": "squaredcos_cap_v2"}),
    ("ddim", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
    ("ddpm", {"clip_sample": True}),
    ("pndm", {"set_alpha_to_one": True}),
    ("pndm", {"beta_schedule": "squaredcos_cap_v2"}),
    ("euler", {"beta_schedule": "squaredcos_cap_v2"}),
    ("euler_karras", {"beta_schedule": "linear"}),
    ("heun", {"clip_sample": True}),
    ("heun", {"use_karras_sigmas": True}),
    ("dpmpp_2m", {"solver_order": 1}),
    ("dpmpp_2m", {"lower_order_final": False}),
    ("dpmpp_2m_karras", {"beta_schedule": "squaredcos_cap_v2"}),
    ("unipc", {"solver_order": 1}),
    ("unipc", {"solver_type": "midpoint", "timestep_spacing": "leading"}),  # diffusers reads it as bh2
    ("unipc", {"use_karras_sigmas": True}),
]


@pytest.mark.parametrize("n", [7, 25])
@pytest.mark.parametrize("name, overrides", VARIANTS)
def test_config_variant_matches_diffusers(name, overrides, n):
    check_parity(name, SD15_INPAINT, n, 1.0, **overrides)
    check_parity(name, SD15_INPAINT, n, 0.6, **overrides)


def test_each_name_means_what_it_says():
    """The public names and what each one is in diffusers, stated here once: the parity tests take both from the
    package's table, so this is what holds that table to the names' meaning."""
    karras = {"use_karras_sigmas": True}
    pp, sde = {"algorithm_type": "dpmsolver++"}, {"algorithm_type": "sde-dpmsolver++"}
    assert {name: diffusers_equivalent(name) for name in schedulers.available()} == {
        "ddpm": ("DDPMScheduler", {}),
        "ddim": ("DDIMScheduler", {}),
        "pndm": ("PNDMScheduler", {}),
        "lms": ("LMSDiscreteScheduler", {}),
        "lms_karras": ("LMSDiscreteScheduler", karras),
        "euler": ("EulerDiscreteScheduler", {}),
        "euler_karras": ("EulerDiscreteScheduler", karras),
        "euler_a": ("EulerAncestralDiscreteScheduler", {}),
        "heun": ("HeunDiscreteScheduler", {}),
        "dpmpp_2m": ("DPMSolverMultistepScheduler", pp),
        "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", pp | karras),
        "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", sde),
        "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", sde | karras),
        "unipc": ("UniPCMultistepScheduler", {}),
    }


@pytest.mark.parametrize("name", NAMES)
def test_configs_saved_by_diffusers_are_accepted(name):
    cls_name, implied = diffusers_equivalent(name)
    # every __init__ argument, defaults included
    saved = dict(getattr(diffusers, cls_name).from_config(SD15_INPAINT, **implied).config)
    for ours in (schedulers.create(name, saved, 10), schedulers.create(name, saved, 10, 0.5)):
        assert len(ours.timesteps) > 0


def test_scheduler_class_can_be_passed_directly():
    s = schedulers.create(schedulers.DDIM, SD15_INPAINT, 10, 0.5, eta=0.5)
    assert s.config.eta == 0.5 and len(s.timesteps) == 5


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="available: .*ddim.*pndm"):
        schedulers.create("dpm_fast", SD15_INPAINT, 10)


@pytest.mark.parametrize(
    "n, strength, message",
    [
        (0, 1.0, "num_inference_steps"),
        (1001, 1.0, "num_inference_steps"),
        (10, 0.0, "strength"),
        (10, 1.5, "strength"),
        (10, 0.05, "no step"),
    ],
)
@pytest.mark.parametrize("name", ["ddim", "euler", "heun"])
def test_bad_step_count_or_strength_raises(name, n, strength, message):
    with pytest.raises(ValueError, match=message):
        schedulers.create(name, SD15_INPAINT, n, strength)


def test_trailing_step_counts_that_diffusers_breaks_are_refused():
    # np.arange(1000, 0, -1000/61) has 62 entries, so diffusers would add a step at t = -1
    with pytest.raises(ValueError, match="trailing"):
        schedulers.create("ddim", SD15_INPAINT, 61, timestep_spacing="trailing")


@pytest.mark.parametrize(
    "key, value",
    [
        ("thresholding", True),
        ("rescale_betas_zero_snr", True),
        ("use_exponential_sigmas", True),
        ("beta_schedule", "sigmoid"),
        ("timestep_spacing", "uniform"),
        ("prediction_type", "flow_prediction"),
        ("shift", 3.0),
        ("final_sigmas_type", "sigma_min"),
        ("algorithm_type", "dpmsolver"),
        ("solver_type", "heun"),
        ("solver_order", 3),
    ],
)
def test_unsupported_config_field_is_named(key, value):
    with pytest.raises(ValueError, match=key):
        schedulers.create("ddim", {**SD15_INPAINT, key: value}, 10)


@pytest.mark.parametrize("overrides", [{"solver_type": "bh1"}, {"lower_order_final": False}])
def test_unipc_settings_that_give_nan_in_diffusers_are_refused(overrides):
    with pytest.raises(ValueError, match=next(iter(overrides))):
        schedulers.create("unipc", SD15_INPAINT, 10, **overrides)


def test_pndm_without_skip_prk_steps_is_refused():
    with pytest.raises(ValueError, match="skip_prk_steps"):
        schedulers.create("pndm", {**SD15_INPAINT, "skip_prk_steps": False}, 10)
