"""The open pipeline: its stages, the steppable loop, and diffusers' inputs and callback (latents=,
prompt_embeds=, callback_on_step_end, _interrupt), each against diffusers on tiny random models (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import diffusers_pipeline, make_image, make_mask
from parity import record

import ldm_inpaint
from ldm_inpaint.family import SD15, SDXL
from ldm_inpaint.pipeline import Request

TOL = 1e-4
W, H = 64, 48


@pytest.fixture(scope="module")
def sd(sd_inpaint_dir):
    return ldm_inpaint.load_pipeline(sd_inpaint_dir), diffusers_pipeline("StableDiffusionInpaintPipeline",
                                                                         sd_inpaint_dir)


@pytest.fixture(scope="module")
def xl(sdxl_inpaint_dir):
    return ldm_inpaint.load_pipeline(sdxl_inpaint_dir), diffusers_pipeline("StableDiffusionXLInpaintPipeline",
                                                                           sdxl_inpaint_dir)


def inpaint_inputs(**kw):
    return {**dict(prompt="a red brick wall", image=make_image(W, H), mask_image=make_mask(W, H), height=H, width=W,
                   num_inference_steps=4), **kw}


def recorder(store: list, edit=None):
    """A callback_on_step_end that keeps every step's latents, and may return edited tensors."""
    def callback(pipe, i, t, tensors):
        store.append(tensors["latents"].clone())
        return edit(pipe, i, tensors) if edit else {}
    return callback


def both_steps(ours, ref, edit=None, **kw):
    """Each step's latents as both sides pass them to callback_on_step_end, and the final images."""
    got, expected = [], []
    out_ref = ref(**kw, generator=torch.Generator().manual_seed(0), output_type="np",
                  callback_on_step_end=recorder(expected, edit))
    out = ours(**kw, generator=torch.Generator().manual_seed(0), output_type="np", progress=False,
               callback_on_step_end=recorder(got, edit))
    return got, expected, out.images, out_ref.images


def assert_close(got, expected, tol=TOL):
    diff = record(float((torch.as_tensor(got) - torch.as_tensor(expected)).abs().max()))
    assert diff <= tol, f"max abs diff {diff:.2e} > {tol}"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("case", ["guided", "two_each_unguided"])
def test_every_steps_latents_match_diffusers_callback(sd, xl, family, case):
    ours, ref = sd if family == "sd15" else xl
    kw = inpaint_inputs() if case == "guided" else inpaint_inputs(num_images_per_prompt=2, guidance_scale=1.0)
    got, expected, images, ref_images = both_steps(ours, ref, **kw)
    assert len(got) == len(expected) >= 3
    for g, e in zip(got, expected):
        assert_close(g, e)
    assert_close(images, ref_images)


def test_callback_edits_latents_and_mask_as_diffusers(sd):
    ours, ref = sd

    def edit(pipe, i, tensors):  # halve the latents at step 1; repaint everything from step 2 on
        out = {"latents": tensors["latents"] * 0.5} if i == 1 else {}
        if i == 2:
            out["mask"] = torch.ones_like(tensors["mask"])
        return out

    kw = inpaint_inputs(callback_on_step_end_tensor_inputs=["latents", "mask"])
    got, expected, images, ref_images = both_steps(ours, ref, edit=edit, **kw)
    for g, e in zip(got, expected):
        assert_close(g, e)
    assert_close(images, ref_images)
    plain = ours(**inpaint_inputs(), generator=torch.Generator().manual_seed(0), output_type="np", progress=False)
    assert np.abs(plain.images - images).max() > 1e-3  # the edits took effect


def test_interrupt_stops_like_diffusers(sd):
    ours, ref = sd

    def stop(pipe, i, tensors):
        if i == 1:
            pipe._interrupt = True
        return {}

    got, expected, images, ref_images = both_steps(ours, ref, edit=stop, **inpaint_inputs())
    assert len(got) == len(expected) == 2
    assert_close(images, ref_images)
    assert ours.interrupt
    count = []  # the flag is reset at the start of the next call, which runs all its steps
    ours(**inpaint_inputs(num_inference_steps=3), output_type="latent", progress=False,
         callback_on_step_end=recorder(count))
    assert len(count) == 3


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_start_latents_match_diffusers(sd, xl, family):
    ours, ref = sd if family == "sd15" else xl
    start = torch.randn(2, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    kw = inpaint_inputs(num_images_per_prompt=2, latents=start, strength=0.7)
    expected = ref(**kw, generator=torch.Generator().manual_seed(0), output_type="np").images
    got = ours(**kw, generator=torch.Generator().manual_seed(0), output_type="np", progress=False).images
    assert_close(got, expected)


def test_start_latents_text_to_image_match_diffusers(sd_dir):
    ours, ref = ldm_inpaint.load_pipeline(sd_dir), diffusers_pipeline("StableDiffusionPipeline", sd_dir)
    start = torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    kw = dict(prompt="a cat", height=H, width=W, num_inference_steps=3, latents=start)
    assert_close(ours(**kw, output_type="np", progress=False).images, ref(**kw, output_type="np").images)


def test_given_latents_replace_the_noise_draw(sd):
    ours, _ = sd
    start = torch.randn(1, 4, H // 8, W // 8)
    a = ours(**inpaint_inputs(latents=start), generator=torch.Generator().manual_seed(0), output_type="latent",
             progress=False).images
    b = ours(**inpaint_inputs(latents=start), generator=torch.Generator().manual_seed(1), output_type="latent",
             progress=False).images
    c = ours(**inpaint_inputs(), generator=torch.Generator().manual_seed(0), output_type="latent",
             progress=False).images
    # only the masked image's posterior sample still depends on the seed
    assert (a - b).abs().max() < (a - c).abs().max()
    with pytest.raises(ValueError, match="latents have shape"):
        ours(**inpaint_inputs(latents=torch.randn(1, 4, 3, 3)), progress=False)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_prompt_embeds_match_diffusers(sd, xl, family):
    ours, ref = sd if family == "sd15" else xl
    g = torch.Generator().manual_seed(5)
    width = ours.unet.cfg.cross_attention_dim
    embeds = dict(prompt_embeds=torch.randn(1, 77, width, generator=g),
                  negative_prompt_embeds=torch.randn(1, 77, width, generator=g))
    if family == "sdxl":
        pooled = ours.text_encoder_2.cfg.projection_dim
        embeds.update(pooled_prompt_embeds=torch.randn(1, pooled, generator=g),
                      negative_pooled_prompt_embeds=torch.randn(1, pooled, generator=g))
    kw = inpaint_inputs(num_images_per_prompt=2, **embeds)
    del kw["prompt"]
    expected = ref(**kw, generator=torch.Generator().manual_seed(0), output_type="np").images
    got = ours(**kw, generator=torch.Generator().manual_seed(0), output_type="np", progress=False).images
    assert_close(got, expected)


def test_prompt_embeds_of_the_prompt_give_the_prompts_image(xl):
    ours, _ = xl
    context, pooled = ours.encode_prompt(["a red brick wall"])
    a = ours(**inpaint_inputs(), generator=torch.Generator().manual_seed(0), output_type="np", progress=False)
    kw = inpaint_inputs(prompt_embeds=context, pooled_prompt_embeds=pooled)
    del kw["prompt"]
    b = ours(**kw, generator=torch.Generator().manual_seed(0), output_type="np", progress=False)
    assert np.abs(a.images - b.images).max() == 0


def test_embeds_errors(sd, xl):
    ours, _ = sd
    embeds = torch.randn(1, 77, ours.unet.cfg.cross_attention_dim)
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        ours(**inpaint_inputs(prompt_embeds=embeds), progress=False)
    kw = inpaint_inputs(prompt_embeds=embeds[0])
    del kw["prompt"]
    with pytest.raises(ValueError, match="batch, tokens, width"):
        ours(**kw, progress=False)
    kw = inpaint_inputs(prompt_embeds=torch.randn(1, 77, xl[0].unet.cfg.cross_attention_dim))
    del kw["prompt"]
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        xl[0](**kw, progress=False)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        ours(**inpaint_inputs(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"]),
             progress=False)


def test_steps_yield_the_calls_latents_and_diffusers_x0(sd):
    """pipe.steps(...) is the loop of pipe(...): same latents; x0 is DDIM's pred_original_sample in diffusers."""
    ours, ref = sd
    from_calls = []
    ours(**inpaint_inputs(), generator=torch.Generator().manual_seed(0), output_type="latent", progress=False,
         callback_on_step_end=recorder(from_calls))
    steps = list(ours.steps(**inpaint_inputs(), generator=torch.Generator().manual_seed(0), progress=False))
    assert [s.i for s in steps] == list(range(len(from_calls)))
    for s, latents in zip(steps, from_calls):
        assert torch.equal(s.latents, latents)
        assert s.model_output.shape[0] == 2 * s.latents.shape[0]  # both halves of the guided batch

    x0s = []
    step = ref.scheduler.step

    def keep_x0(*args, **kwargs):
        out = step(*args, **{**kwargs, "return_dict": True})
        x0s.append(out.pred_original_sample)
        return out if kwargs.get("return_dict", True) else (out.prev_sample,)

    ref.scheduler.step = keep_x0
    try:
        ref(**inpaint_inputs(), generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        del ref.scheduler.step
    assert len(x0s) == len(steps)
    for s, x0 in zip(steps, x0s):
        assert_close(s.x0, x0)


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "pndm"])
def test_x0_is_the_clean_latents_the_step_aims_at(sd, scheduler):
    """For any kind of scheduler, re-noising x0 with the guided ε at the call's own noise level gives back the
    latents the call started from (x = x0 + σ·ε, or √ᾱ·x0 + √(1−ᾱ)·ε): a check that needs no reference."""
    ours, _ = sd
    kw = inpaint_inputs(scheduler=scheduler)
    run = ours.prepare(Request.of(**kw, generator=torch.Generator().manual_seed(0), progress=False))
    latents = run.latents
    from ldm_inpaint.sampling import guide

    for step in ours.sample(run):
        eps = guide(step.model_output, run.cond)
        # add_noise(x0, ε, i) is the sample at call i's noise level made of that x0 and ε
        assert_close(run.scheduler.add_noise(step.x0, eps, step.i), latents, 1e-4)
        latents = step.latents


def test_steps_can_stop_early_and_steer(sd):
    ours, _ = sd
    run = ours.prepare(Request.of(**inpaint_inputs(), generator=torch.Generator().manual_seed(0), progress=False))
    seen = []
    for step in ours.sample(run):
        seen.append(step.i)
        if step.i == 0:
            step.latents = torch.zeros_like(step.latents)  # the loop continues from here
        if step.i == 1:
            break
    assert seen == [0, 1]
    out = ours.finish(run, step.latents)
    assert len(out.images) == 1 and out.images[0].size == (W, H)


def test_family_is_data(sd, xl, sd_dir):
    assert sd[0].family.name == "sd15" and xl[0].family.name == "sdxl"
    assert xl[0].family.zero_negatives and not sd[0].family.zero_negatives
    # defaults come from the family: SDXL inpainting's strength 0.9999 skips the first of 5 DDIM steps
    run = xl[0].prepare(Request.of(**inpaint_inputs(num_inference_steps=5, scheduler="ddim"), progress=False))
    assert run.cond.guidance_scale == SDXL.guidance_scale["inpaint"] and len(run.scheduler.timesteps) == 4
    plain = ldm_inpaint.load_pipeline(sd_dir)
    run = plain.prepare(Request.of("a cat", image=make_image(W, H), num_inference_steps=10, scheduler="ddim",
                                   progress=False))
    assert run.task == "img2img" and len(run.scheduler.timesteps) == int(10 * SD15.strength["img2img"])
    with pytest.raises(ValueError, match="conventions"):
        sd[0](**inpaint_inputs(conventions="comfy"), progress=False)


# -- cross-attention maps ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_attention_maps_sum_to_one_and_leave_the_images_unchanged(sd, xl, family):
    ours, _ = sd if family == "sd15" else xl
    kw = inpaint_inputs(prompt=["a red brick wall", "a cat on a hill"], num_images_per_prompt=2)
    plain = ours(**kw, generator=torch.Generator().manual_seed(0), output_type="np", progress=False)
    out = ours(**kw, generator=torch.Generator().manual_seed(0), output_type="np", progress=False,
               return_attention_maps=True)
    assert plain.attention_maps is None
    assert np.abs(out.images - plain.images).max() <= 1e-5
    maps = out.attention_maps
    assert maps.shape == (4, 77, H // 8, W // 8)
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(4, H // 8, W // 8), atol=1e-5, rtol=0)
    # rows follow the outputs: two images per prompt; the two prompts' maps differ
    assert (maps[0] - maps[2]).abs().max() > 1e-3
    # the maps are those of the text-conditioned half: unguided runs give maps of the same prompts' context
    unguided = ours(**kw, guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="latent",
                    progress=False, return_attention_maps=True).attention_maps
    assert unguided.shape == maps.shape


def test_cli_writes_one_attention_map_per_prompt_token(sd_inpaint_dir, tmp_path):
    from ldm_inpaint.sample import main

    make_image(W, H).save(tmp_path / "in.png")
    make_mask(W, H).save(tmp_path / "mask.png")
    code = main(["--model", str(sd_inpaint_dir), "--image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "--prompt", "a red brick wall", "--steps", "2", "--out",
                 str(tmp_path / "out.png"), "--attention-maps", str(tmp_path / "maps"), "--no-progress"])
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert names == ["01_a.png", "02_red.png", "03_brick.png", "04_wall.png"]


# -- cases that once fell short (issue 11 part 7) ----------------------------------------------------------------
def test_vae_encoding_of_a_channels_last_image_equals_diffusers_exactly(sd_inpaint_dir):
    """The preprocessed image is channels-last; the mid-block attention's GroupNorm must see diffusers' (B, C, H·W)
    view, or the encodings differ by ~5e-7 — which a random UNet amplifies ~40× per step."""
    import diffusers

    from ldm_inpaint.image import preprocess_image

    ours = ldm_inpaint.load_pipeline(sd_inpaint_dir).vae
    ref = diffusers.AutoencoderKL.from_pretrained(sd_inpaint_dir / "vae").eval()
    x = preprocess_image(make_image(96, 64), 64, 96)
    assert x.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got, expected = ours.encode(x), ref.encode(x).latent_dist
    assert torch.equal(got.mean, expected.mean) and torch.equal(got.logvar, expected.logvar)


LONG_PROMPT = " ".join(["a red brick wall with ivy and a small wooden door"] * 9)  # 96 tokens, cut at 77


def test_long_prompt_guided_two_each_ddim_matches_diffusers(sd):
    ours, ref = sd
    kw = dict(prompt=LONG_PROMPT, image=make_image(96, 64), mask_image=make_mask(96, 64, (24, 8, 72, 48)),
              height=64, width=96, guidance_scale=7.0, num_images_per_prompt=2, num_inference_steps=5)
    expected = ref(**kw, generator=torch.Generator().manual_seed(0), output_type="np").images
    got = ours(**kw, generator=torch.Generator().manual_seed(0), output_type="np", progress=False,
               scheduler="ddim").images
    assert_close(got, expected, 1e-5)


def test_sdxl_prompt_2_two_each_ddim_matches_diffusers(xl):
    import diffusers

    ours, ref = xl
    ref.scheduler, original = diffusers.DDIMScheduler.from_config(ref.scheduler.config), ref.scheduler
    try:
        kw = dict(prompt="a red brick wall", prompt_2="a photo, detailed", image=make_image(64, 96),
                  mask_image=make_mask(64, 96, (8, 24, 48, 72)), height=96, width=64, num_images_per_prompt=2,
                  num_inference_steps=6)
        expected = ref(**kw, generator=torch.Generator().manual_seed(0), output_type="np").images
        got = ours(**kw, generator=torch.Generator().manual_seed(0), output_type="np", progress=False,
                   scheduler="ddim").images
    finally:
        ref.scheduler = original
    assert_close(got, expected, 1e-5)


def test_original_conventions_reach_the_scheduler_and_tokenizer(sd, xl):
    """conventions="original" is one field of the run's Family: ldm's DDIM runs 8 UNet calls for 7 steps, and
    SDXL's second tokenizer merges "!" as open_clip does (so the image changes)."""
    ours, _ = sd
    calls = []
    ours(**inpaint_inputs(num_inference_steps=7, scheduler="ddim"), conventions="original", output_type="latent",
         progress=False, callback_on_step_end=recorder(calls))
    assert len(calls) == 8
    xl_pipe, _ = xl
    kw = inpaint_inputs(prompt="hello!! world!", num_inference_steps=2)
    a, b = (xl_pipe(**kw, conventions=c, generator=torch.Generator().manual_seed(0), output_type="latent",
                    progress=False).images for c in ("diffusers", "original"))
    assert (a - b).abs().max() > 1e-4


def test_img2img_start_latents_match_diffusers_sdxl(sdxl_dir):
    """SDXL img2img takes given latents as the start itself (no image encoding, no noise drawn)."""
    ours, ref = ldm_inpaint.load_pipeline(sdxl_dir), diffusers_pipeline("StableDiffusionXLImg2ImgPipeline", sdxl_dir)
    start = torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    kw = dict(prompt="a cat", image=make_image(W, H), num_inference_steps=5, strength=0.6, latents=start)
    expected = ref(**kw, generator=torch.Generator().manual_seed(0), output_type="np").images
    got = ours(**kw, generator=torch.Generator().manual_seed(0), output_type="np", progress=False).images
    assert_close(got, expected)
