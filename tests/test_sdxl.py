"""SDXL pipelines against diffusers' StableDiffusionXL{Inpaint,,Img2Img}Pipeline on tiny random SDXL-shaped
models (two text encoders, text_time conditioning), fp32, same seed."""

from __future__ import annotations

import pytest
import torch
from conftest import diffusers_pipeline, make_image, make_mask
from test_pipeline import run_both

import ldm_inpaint

W, H = 64, 48


@pytest.fixture(scope="module")
def xl_inpaint(sdxl_inpaint_dir):
    return ldm_inpaint.load_pipeline(sdxl_inpaint_dir), diffusers_pipeline("StableDiffusionXLInpaintPipeline",
                                                                           sdxl_inpaint_dir)


@pytest.fixture(scope="module")
def xl_base(sdxl_dir):
    return ldm_inpaint.load_pipeline(sdxl_dir), sdxl_dir


INPAINT_CASES = {
    "defaults_no_negative": dict(),  # strength 0.9999 skips the first step; zero negative embeddings
    "negative_and_prompt_2": dict(negative_prompt="blurry", prompt_2="a cat", negative_prompt_2="dark"),
    "empty_negative_is_encoded": dict(negative_prompt=""),
    "strength_1": dict(strength=1.0),
    "strength_0.6": dict(strength=0.6),
    "guidance_rescale_and_sizes": dict(guidance_rescale=0.7, original_size=(96, 128), crops_coords_top_left=(4, 8),
                                       target_size=(48, 64), negative_original_size=(32, 32)),
    "two_prompts_two_each": dict(prompt=["a red brick wall", "a cat"], num_images_per_prompt=2),
    "unguided": dict(guidance_scale=1.0),
    "square": dict(size=(64, 64)),
}


@pytest.mark.parametrize("case", INPAINT_CASES)
def test_sdxl_inpaint_matches_diffusers(xl_inpaint, case):
    ours, ref = xl_inpaint
    kw = dict(INPAINT_CASES[case])
    w, h = kw.pop("size", (W, H))
    kw.setdefault("prompt", "a red brick wall")
    run_both(ours, ref, image=make_image(w, h), mask_image=make_mask(w, h), height=h, width=w, **kw)


TXT2IMG_CASES = {
    "defaults": dict(),
    "negatives_and_sizes": dict(negative_prompt="blurry", negative_prompt_2="dark", prompt_2="a cat",
                                original_size=(96, 128), crops_coords_top_left=(4, 8),
                                negative_original_size=(32, 32), negative_target_size=(48, 64),
                                negative_crops_coords_top_left=(2, 2), guidance_rescale=0.5),
    "two_each": dict(num_images_per_prompt=2),
}


@pytest.mark.parametrize("case", TXT2IMG_CASES)
def test_sdxl_text_to_image_matches_diffusers(xl_base, case):
    ours, folder = xl_base
    ref = diffusers_pipeline("StableDiffusionXLPipeline", folder)
    run_both(ours, ref, prompt="a red brick wall", height=H, width=W, **TXT2IMG_CASES[case])


@pytest.mark.parametrize("strength", [None, 0.6])  # None: the SDXL img2img default 0.3
def test_sdxl_img2img_matches_diffusers(xl_base, strength):
    ours, folder = xl_base
    ref = diffusers_pipeline("StableDiffusionXLImg2ImgPipeline", folder)
    kw = {} if strength is None else dict(strength=strength)
    run_both(ours, ref, prompt="a red brick wall", image=make_image(), negative_prompt="blurry", num_inference_steps=5,
             **kw)


def test_sdxl_inpaint_with_base_model_matches_diffusers(xl_base):
    ours, folder = xl_base
    ref = diffusers_pipeline("StableDiffusionXLInpaintPipeline", folder)
    run_both(ours, ref, prompt="a red brick wall", image=make_image(), mask_image=make_mask(), height=H, width=W)


def test_sdxl_vae_stays_fp32_when_its_config_forces_upcast(sdxl_dir, sd_dir):
    xl = ldm_inpaint.load_pipeline(sdxl_dir, dtype=torch.bfloat16)
    sd = ldm_inpaint.load_pipeline(sd_dir, dtype=torch.bfloat16)
    assert xl.vae_dtype == torch.float32 and xl.dtype == torch.bfloat16
    assert sd.vae_dtype == torch.bfloat16
    out = xl("a cat", height=H, width=W, num_inference_steps=2, output_type="np", progress=False).images
    assert out.shape == (1, H, W, 3)
