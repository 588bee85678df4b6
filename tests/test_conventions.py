"""conventions="original": the numbers of the code the checkpoints were released with (CompVis/runwayml `ldm`
for SD 1.x, Stability's `sgm` for SDXL) where ldm_inpaint otherwise follows diffusers (docs/parity.md, "The
original code's conventions"). Each expected value is computed here from the original's definition, not with
our code; "diffusers" stays covered by the parity tests (test_tokenizer.py, test_schedulers.py)."""

import json
from pathlib import Path

import pytest
import torch

from ldm_inpaint import schedulers
from ldm_inpaint.tokenizer import CLIPTokenizer, _clip_vocab, tokenize

VOCAB = _clip_vocab()[0]
BOS, EOS = 49406, 49407
CONFIGS = Path(__file__).resolve().parents[1] / "ldm_inpaint" / "configs"
SD15_INPAINT = json.loads((CONFIGS / "sd15-inpainting" / "scheduler.json").read_text())  # DDIM
SDXL_INPAINT = json.loads((CONFIGS / "sdxl-inpainting" / "scheduler.json").read_text())  # Euler, "leading"
T = 1000


def ids(*tokens, pad=0, length=77):
    """[BOS, the vocabulary ids of whole `tokens`, EOS] padded to `length`: what a tokenizer that keeps each
    of these words whole gives."""
    row = [BOS, *(VOCAB[t] for t in tokens), EOS]
    return row + [pad] * (length - len(row))


@pytest.fixture(scope="module")
def tokenizer_2():  # SDXL's second tokenizer (OpenCLIP ViT-bigG/14), pad "!"
    return CLIPTokenizer.from_packaged(pad_token="!")


@pytest.fixture(scope="module")
def tokenizer():  # SD 1.x / SDXL's first tokenizer (CLIP ViT-L/14), pad "<|endoftext|>"
    return CLIPTokenizer.from_packaged()


# --- 1. SDXL's second tokenizer: open_clip's SimpleTokenizer ---------------------------------------------------


def test_tokenizer_2_keeps_bang_in_words_under_original(tokenizer_2):
    # open_clip BPE-merges "!" like any character: "!!" is the single token "!!</w>", a lone "!" is "!</w>"
    # (256); transformers, with "!" as tokenizer_2's pad (a special token), cuts each "!" out as id 0
    prompt = ["hello!! world!"]
    assert tokenize(tokenizer_2, prompt, "original")[0].tolist() == ids("hello</w>", "!!</w>", "world</w>", "!</w>")
    assert tokenize(tokenizer_2, prompt)[0].tolist() == ids("hello</w>", "!", "!", "world</w>", "!")
    assert VOCAB["!"] == 0 and VOCAB["!</w>"] == 256


def test_original_cleans_text_as_open_clip(tokenizer_2):
    # HTML entities unescaped twice, white space collapsed and stripped, then lower case
    assert tokenize(tokenizer_2, ["  A &amp;amp; B\t\n"], "original")[0].tolist() == ids("a</w>", "&</w>", "b</w>")
    assert tokenize(tokenizer_2, ["A &amp; B"])[0].tolist() != ids("a</w>", "&</w>", "b</w>")


def test_open_clip_names_its_own_special_tokens(tokenizer_2):
    # open_clip's special words are <start_of_text> / <end_of_text> (any case); transformers' <|endoftext|>
    # is plain text there
    original = tokenize(tokenizer_2, ["a <End_Of_Text> b", "a <|endoftext|> b"], "original")
    assert original[0].tolist() == [BOS, VOCAB["a</w>"], EOS, VOCAB["b</w>"], EOS] + [0] * 72
    assert original[1].tolist().count(EOS) == 1  # only the final one


def test_original_cuts_long_prompts_as_open_clip(tokenizer_2):
    # open_clip: tokens[:77] with the last replaced by EOT, then zeros — BOS + 75 tokens + EOS
    row = tokenize(tokenizer_2, ["go! " * 50], "original")[0].tolist()
    assert row == [BOS] + [VOCAB["go</w>"], VOCAB["!</w>"]] * 37 + [VOCAB["go</w>"], EOS]


def test_first_tokenizer_is_unchanged_under_original(tokenizer):
    # the original code tokenizes CLIP ViT-L/14 with transformers' CLIPTokenizer too
    prompts = ["hello!! world!", "A &amp; B", "a <|endoftext|> b", "go! " * 50]
    assert torch.equal(tokenize(tokenizer, prompts, "original"), tokenize(tokenizer, prompts))


def test_unknown_convention_is_refused(tokenizer_2):
    with pytest.raises(ValueError, match="conventions must be one of"):
        tokenize(tokenizer_2, ["a"], "sgm")


# --- the original schedules, from their definitions ------------------------------------------------------------


def original_alpha_bar():
    """ᾱ as ldm and sgm compute it (`make_beta_schedule("linear")`: √β linear in float64, squared; then the
    float64 cumulative product); SD's β from 0.00085 to 0.012."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def original_sigmas():
    alpha_bar = original_alpha_bar()
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def ldm_ddim_timesteps(n):
    """ldm `make_ddim_timesteps("uniform")`: every (T // n)-th step from 0, + 1; sampled from the last."""
    return [t + 1 for t in range(0, T, T // n)][::-1]


def sgm_timesteps(n):
    """sgm `generate_roughly_equally_spaced_steps`: np.linspace(T − 1, 0, n, endpoint=False) cast to int, in
    numpy's arithmetic (point k = k·step + start, step = (stop − start)/n), descending as sampled."""
    return [int(k * ((0 - (T - 1)) / n) + (T - 1)) for k in range(n)]


# --- 4. DDIM: ldm's timesteps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [6, 7, 30, 50])
def test_original_ddim_runs_ldm_timesteps(n):
    expected = ldm_ddim_timesteps(n)
    assert schedulers.create("ddim", SD15_INPAINT, n, conventions="original").timesteps.tolist() == expected
    # diffusers ("leading", steps_offset 1): the same grid, cut at n steps
    assert schedulers.create("ddim", SD15_INPAINT, n).timesteps.tolist() == expected[-n:]


def test_original_ddim_runs_8_steps_when_asked_for_7():
    timesteps = schedulers.create("ddim", SD15_INPAINT, 7, conventions="original").timesteps.tolist()
    assert timesteps == [995, 853, 711, 569, 427, 285, 143, 1]


def test_original_ddim_steps_like_ldm():
    # ldm `DDIMSampler.p_sample_ddim`, η = 0: x̂_0 = (x − √(1 − a_t)·ε)/√a_t, x_prev = √a_prev·x̂_0 + √(1 − a_prev)·ε,
    # a_prev the ᾱ of the DDIM timestep below, ᾱ_0 after the last one (`make_ddim_sampling_parameters`)
    alpha_bar = original_alpha_bar().float()  # ldm keeps its float64 ᾱ as a float32 buffer
    timesteps = ldm_ddim_timesteps(7)
    scheduler = schedulers.create("ddim", SD15_INPAINT, 7, conventions="original")
    generator = torch.Generator().manual_seed(0)
    x = ours = torch.randn(1, 4, 8, 8, generator=generator)
    for i, (t, t_prev) in enumerate(zip(timesteps, timesteps[1:] + [0], strict=True)):
        eps = torch.randn(x.shape, generator=generator)
        a_t, a_prev = alpha_bar[t], alpha_bar[t_prev]
        x = a_prev**0.5 * (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5 + (1 - a_prev) ** 0.5 * eps
        ours = scheduler.step(eps, i, ours)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [3, 9, 36, 600])
def test_original_ddim_refuses_step_counts_ldm_cannot_run(n):
    assert ldm_ddim_timesteps(n)[0] == T  # ldm would index ᾱ[1000] and fail
    with pytest.raises(ValueError, match=f"cannot run num_inference_steps={n}"):
        schedulers.create("ddim", SD15_INPAINT, n, conventions="original")


# --- 3. σ schedulers: sgm's truncated timesteps ------------------------------------------------------------------


def test_sgm_truncates_where_diffusers_trailing_rounds():
    assert sgm_timesteps(3) == [999, 666, 333]
    original = schedulers.create("euler", SDXL_INPAINT, 3, conventions="original")
    trailing = schedulers.create("euler", SDXL_INPAINT, 3, timestep_spacing="trailing")
    assert original.timesteps.tolist() == [999, 666, 333]
    assert trailing.timesteps.tolist() == [999, 666, 332]


@pytest.mark.parametrize("n", [1, 3, 30, 99])
@pytest.mark.parametrize("name", ["euler", "euler_a", "lms", "heun"])
def test_original_sigma_schedulers_run_sgm_timesteps(name, n):
    expected = sgm_timesteps(n)
    if name == "heun":  # two model calls per step after the first, as diffusers' (and sgm's) Heun
        expected = expected[:1] + [t for t in expected[1:] for _ in range(2)]
    for spacing in ("leading", "trailing", "linspace"):  # the config's spacing does not matter
        scheduler = schedulers.create(name, SDXL_INPAINT, n, conventions="original", timestep_spacing=spacing)
        assert scheduler.timesteps.tolist() == expected


@pytest.mark.parametrize("n", [3, 30])
def test_original_sigmas_are_sgm_sigmas(n):
    sigmas = schedulers.create("euler", SDXL_INPAINT, n, conventions="original").sigmas
    expected = torch.cat([original_sigmas()[sgm_timesteps(n)], torch.zeros(1, dtype=torch.float64)])
    # float32 ᾱ (diffusers') against sgm's float64: ≤ 1.3e-5 relative
    torch.testing.assert_close(sigmas.double(), expected, rtol=2e-5, atol=0)


def test_original_refuses_karras_sigmas():
    with pytest.raises(ValueError, match="no Karras"):
        schedulers.create("euler_karras", SDXL_INPAINT, 10, conventions="original")


# --- 2. σ schedulers: sgm's initial noise --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["euler", "euler_a", "lms", "heun"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_original_initial_noise_is_sqrt_one_plus_sigma_max_squared(spacing, name):
    # sgm `prepare_sampling_loop`: x *= √(1 + σ_0²), σ_0 = σ at t = 999
    sigma_max = original_sigmas()[T - 1].item()
    scheduler = schedulers.create(name, SDXL_INPAINT, 30, conventions="original", timestep_spacing=spacing)
    assert scheduler.init_noise_sigma == pytest.approx((1 + sigma_max**2) ** 0.5, rel=1e-6)


def test_diffusers_trailing_starts_0_23_percent_lower():
    original = schedulers.create("euler", SDXL_INPAINT, 30, conventions="original")
    trailing = schedulers.create("euler", SDXL_INPAINT, 30, timestep_spacing="trailing")
    assert trailing.init_noise_sigma == pytest.approx(original_sigmas()[T - 1].item(), rel=1e-6)  # σ_max
    assert original.init_noise_sigma / trailing.init_noise_sigma == pytest.approx(1.002338, abs=1e-6)


# --- what "original" leaves alone, and bad names -------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddpm", "pndm", "dpmpp_2m", "dpmpp_2m_karras", "unipc"])
def test_other_schedulers_are_unchanged_under_original(name):
    config = SD15_INPAINT if name in ("ddpm", "pndm") else SDXL_INPAINT
    original = schedulers.create(name, config, 7, conventions="original")
    default = schedulers.create(name, config, 7)
    assert torch.equal(original.timesteps, default.timesteps)
    assert original.init_noise_sigma == default.init_noise_sigma


def test_unknown_convention_is_refused_by_create():
    with pytest.raises(ValueError, match="conventions='sgm' is not supported"):
        schedulers.create("euler", SDXL_INPAINT, 10, conventions="sgm")


def test_a_scheduler_config_cannot_set_conventions():
    with pytest.raises(ValueError, match="unknown scheduler config key 'conventions'"):
        schedulers.create("euler", {**SDXL_INPAINT, "conventions": "original"}, 10)
