"""Inpainting that keeps the picture (issue 7), on tiny random models: exact preservation away from the mask,
parity with diffusers for padding_mask_crop and for mask_blur, latent drift with and without
masked_latents_blend, outpainting, mask edits and alpha masks, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import diffusers_pipeline, make_image, make_mask
from PIL import Image
from scipy.ndimage import distance_transform_edt
from test_pipeline import run_both

import ldm_inpaint
from ldm_inpaint.image import preprocess_image
from ldm_inpaint.inpaint import (crop_region, edit_mask, extend_canvas, feather_width, mask_from_alpha,
                                 resize_cover, resize_fill)
from ldm_inpaint.sample import main

STEPS = 2
W, H = 96, 64
BOX = (40, 20, 64, 40)  # the repainted rectangle: room around it for the untouched region


@pytest.fixture(scope="module")
def sd9(sd_inpaint_dir):
    return ldm_inpaint.load_pipeline(sd_inpaint_dir), diffusers_pipeline("StableDiffusionInpaintPipeline",
                                                                         sd_inpaint_dir)


@pytest.fixture(scope="module")
def models(request):
    """Built and loaded lazily: each test worker pays only for the models its tests use."""
    folders = {"sd15-inpainting": "sd_inpaint_dir", "sd15-4channel": "sd_dir", "sdxl-inpainting": "sdxl_inpaint_dir"}
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = ldm_inpaint.load_pipeline(request.getfixturevalue(folders[name]))
        return cache[name]
    return get


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def distance_from(mask: Image.Image) -> np.ndarray:
    """Euclidean distance of each pixel to the mask (0 on it), by scipy: independent of our own."""
    return distance_transform_edt(np.asarray(mask.convert("L")) < 128)


# -- preserve_unmasked ---------------------------------------------------------------------------------------------
PRESERVE_CASES = {
    "sd15-inpainting": dict(),
    "sd15-inpainting-blur2": dict(mask_blur=2),
    "sd15-inpainting-blur1.5-grow3": dict(mask_blur=1.5, mask_grow=3),
    "sd15-4channel-blur2": dict(mask_blur=2),
    "sdxl-inpainting-blur2": dict(mask_blur=2),
}


@pytest.mark.parametrize("case", PRESERVE_CASES)
def test_preserve_unmasked_is_exact_away_from_the_mask(models, case):
    pipe = models(case.rsplit("-blur", 1)[0])
    kw = dict(PRESERVE_CASES[case])
    image, mask = make_image(W, H), make_mask(W, H, BOX)
    out = pipe("a cat", image=image, mask_image=mask, num_inference_steps=STEPS, generator=gen(),
               preserve_unmasked=True, progress=False, **kw).images[0]
    raw = pipe("a cat", image=image, mask_image=mask, num_inference_steps=STEPS, generator=gen(),
               progress=False, **kw).images[0]
    got, src, raw = (np.asarray(i).astype(int) for i in (out, image, raw))
    grown = edit_mask(mask, grow=kw.get("mask_grow", 0))
    d = distance_from(grown)
    far = d > feather_width(kw.get("mask_blur", 0))
    assert np.abs(got - src)[far].max() == 0  # the input's bytes, exactly
    assert np.array_equal(got[d == 0], raw[d == 0])  # on the mask: the generated pixels
    assert np.abs(raw - src)[far].mean() > 1  # there was something to preserve: the model alone changes them
    border = (d > 0) & ~far  # the blend: between the two
    lo, hi = np.minimum(src, raw)[border], np.maximum(src, raw)[border]
    assert np.all((got[border] >= lo - 1) & (got[border] <= hi + 1))


def test_preserve_unmasked_keeps_the_input_size_and_np_output(models):
    pipe = models("sd15-inpainting")
    image, mask = make_image(70, 53), make_mask(70, 53, (30, 20, 50, 40))  # worked on at 64×48
    kw = dict(image=image, mask_image=mask, num_inference_steps=STEPS, preserve_unmasked=True, progress=False)
    pil = pipe("a cat", generator=gen(), **kw).images[0]
    arr = pipe("a cat", generator=gen(), output_type="np", **kw).images
    assert pil.size == (70, 53) and arr.shape == (1, 53, 70, 3)
    assert np.array_equal(np.asarray(pil), (arr[0] * 255).round().astype(np.uint8))
    far = distance_from(mask) > feather_width(0)
    assert np.array_equal(np.asarray(pil)[far], np.asarray(image)[far])


# -- parity with diffusers ------------------------------------------------------------------------------------------
CROP_CASES = {
    "default_size": dict(padding_mask_crop=8),  # the model's size (64 for the tiny model), as diffusers
    "wide_working_size": dict(padding_mask_crop=4, height=32, width=64),
    "padding_past_the_edges_is_clamped": dict(padding_mask_crop=10_000, height=48, width=64),
    "blurred_mask": dict(padding_mask_crop=6, blur=3),
}


@pytest.mark.parametrize("case", CROP_CASES)
def test_padding_mask_crop_matches_diffusers(sd9, case):
    ours, ref = sd9
    kw = dict(CROP_CASES[case])
    blur = kw.pop("blur", 0)
    image, mask = make_image(160, 120), make_mask(160, 120, (100, 30, 124, 50))
    ref_mask = ref.mask_processor.blur(mask, blur_factor=blur) if blur else mask
    calls = dict(prompt="a cat", image=image, **kw)
    expected = np.asarray(ref(**calls, mask_image=ref_mask, num_inference_steps=STEPS, generator=gen()).images[0])
    got = np.asarray(ours(**calls, mask_image=mask, mask_blur=blur, num_inference_steps=STEPS, generator=gen(),
                          progress=False).images[0])
    diff = np.abs(got.astype(int) - expected).max()
    print(f"{case}: max |diff| = {diff} levels ({(got != expected).mean():.3%} of values)")
    assert got.shape == (120, 160, 3) and diff <= 1
    outside = np.asarray(ref_mask.convert("L")) == 0
    assert np.array_equal(got[outside], np.asarray(image)[outside])  # the original wherever the mask is 0


def test_padding_mask_crop_matches_diffusers_sdxl(sdxl_inpaint_dir, models):
    ref = diffusers_pipeline("StableDiffusionXLInpaintPipeline", sdxl_inpaint_dir)
    image, mask = make_image(160, 120), make_mask(160, 120, (100, 30, 124, 50))
    kw = dict(prompt="a cat", image=image, mask_image=mask, padding_mask_crop=8, num_inference_steps=STEPS)
    expected = np.asarray(ref(**kw, generator=gen()).images[0]).astype(int)
    got = np.asarray(models("sdxl-inpainting")(**kw, generator=gen(), progress=False).images[0]).astype(int)
    diff = np.abs(got - expected).max()
    print(f"sdxl padding_mask_crop: max |diff| = {diff} levels")
    assert diff <= 1


@pytest.mark.parametrize("blur", [2, 3.5])
def test_mask_blur_matches_diffusers_with_a_blurred_mask(sd9, blur):
    ours, ref = sd9
    image, mask = make_image(W, H), make_mask(W, H, BOX)
    # diffusers' users blur the mask themselves; the pipeline then binarises it for the model
    run_both(lambda mask_image, **kw: ours(mask_image=mask, mask_blur=blur, **kw),
             lambda mask_image, **kw: ref(mask_image=ref.mask_processor.blur(mask, blur_factor=blur), **kw),
             prompt="a cat", image=image, mask_image=None, height=H, width=W)


def test_invert_and_grow_match_diffusers_given_the_edited_mask(sd9):
    ours, ref = sd9
    image, mask = make_image(W, H), make_mask(W, H, BOX)
    edited = edit_mask(mask, invert=True, grow=-2)
    run_both(lambda mask_image, **kw: ours(mask_image=mask, invert_mask=True, mask_grow=-2, **kw),
             lambda mask_image, **kw: ref(mask_image=edited, **kw),
             prompt="a cat", image=image, mask_image=None, height=H, width=W)


def test_crop_region_and_resizes_follow_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    ip = VaeImageProcessor()
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = rng.integers(16, 90, size=2)
        x0, y0 = rng.integers(0, w - 1), rng.integers(0, h - 1)
        box = (x0, y0, rng.integers(x0 + 1, w + 1), rng.integers(y0 + 1, h + 1))
        mask = make_mask(int(w), int(h), box)
        tw, th = 8 * rng.integers(2, 12, size=2)
        pad = int(rng.integers(0, 40))
        assert crop_region(mask, tw, th, pad) == tuple(ip.get_crop_region(mask, tw, th, pad=pad))
    image = make_image(50, 37)
    for tw, th in [(64, 48), (32, 64), (64, 64), (40, 24)]:
        assert np.array_equal(np.asarray(resize_fill(image, tw, th)),
                              np.asarray(ip.resize(image, th, tw, resize_mode="fill")))
        assert np.array_equal(np.asarray(resize_cover(image, tw, th)),
                              np.asarray(ip.resize(image, th, tw, resize_mode="crop")))


# -- masked_latents_blend: drift of the unmasked area ----------------------------------------------------------------
@pytest.mark.parametrize("model", ["sd15-inpainting", "sdxl-inpainting"])
def test_masked_latents_blend_reduces_drift(models, model):
    """Mean |change| outside the mask before any paste-back, in pixels (against the input, and against the
    VAE's own reconstruction of it: what a perfect known region would decode to) and in latents."""
    pipe = models(model)
    image, mask = make_image(W, H), make_mask(W, H, BOX)
    known = pipe.encode_image(preprocess_image(image, H, W), None, sample=False)
    recon = (pipe.decode(known)[0].permute(1, 2, 0).numpy() * 0.5 + 0.5).clip(0, 1)
    keep_px = np.asarray(mask) == 0
    keep_lat = torch.nn.functional.interpolate(torch.from_numpy(keep_px[None, None].astype(np.float32)),
                                               size=known.shape[-2:])[0, 0].bool()
    src = np.asarray(image, dtype=np.float32) / 255
    drift = {}
    for blend in (False, True):
        kw = dict(image=image, mask_image=mask, num_inference_steps=4, strength=1.0, masked_latents_blend=blend,
                  progress=False)  # strength 1 (SDXL's default skips a step): the known latents are the mean
        lat = pipe("a cat", generator=gen(), output_type="latent", **kw).images
        px = pipe("a cat", generator=gen(), output_type="np", **kw).images[0]
        drift[blend] = (float(np.abs(px - src)[keep_px].mean()), float(np.abs(px - recon)[keep_px].mean()),
                        float((lat - known)[0][:, keep_lat].abs().mean()))
    for blend, (vs_input, vs_recon, latent) in drift.items():
        print(f"{model} masked_latents_blend={blend}: pixels vs input {vs_input:.4f}, vs VAE reconstruction "
              f"{vs_recon:.4f}, latents {latent:.4f}")
    assert drift[True][0] <= drift[False][0] and drift[True][1] <= drift[False][1]
    assert drift[True][2] < 1e-6 < drift[False][2]  # the known latents come back as they were encoded


def test_masked_latents_blend_leaves_the_random_stream_alone(models):
    pipe = models("sd15-inpainting")  # with the mean as the known latents, nothing extra is drawn: same noise
    kw = dict(image=make_image(W, H), mask_image=make_mask(W, H, BOX), num_inference_steps=1, output_type="latent",
              progress=False)
    g1, g2 = gen(), gen()
    pipe("a cat", generator=g1, **kw)
    pipe("a cat", generator=g2, masked_latents_blend=True, **kw)
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))


# -- outpainting ----------------------------------------------------------------------------------------------------
def test_outpaint_extends_and_preserves_the_original(models):
    pipe = models("sd15-inpainting")
    image = make_image(64, 48)
    out = ldm_inpaint.outpaint(pipe, "a cat", image, left=16, right=5, bottom=3, num_inference_steps=STEPS,
                               generator=gen(), preserve_unmasked=True, progress=False).images[0]
    assert out.size == (88, 56)  # 64 + 16 + 5 → 85 → 88 (3 more on the right); 48 + 3 → 51 → 56
    _, mask = extend_canvas(image, 16, 0, 5 + 3, 3 + 5, overlap=8)
    far = distance_from(mask) > feather_width(0)
    canvas = np.zeros((56, 88, 3), np.uint8)
    canvas[:48, 16:80] = np.asarray(image)
    assert far.sum() > 500 and np.array_equal(np.asarray(out)[far], canvas[far])


def test_extend_canvas_rounds_up_and_fills_with_edges():
    image = make_image(20, 12)
    canvas, mask = extend_canvas(image, left=3, top=0, right=0, bottom=0, overlap=2)
    assert canvas.size == (24, 16)  # only the left extended: its side takes the width's rounding, bottom the height's
    c, m, src = np.asarray(canvas), np.asarray(mask), np.asarray(image)
    assert np.array_equal(c[:12, 4:], src) and np.array_equal(c[:12, :4], np.repeat(src[:, :1], 4, axis=1))
    assert np.array_equal(c[12:], np.repeat(c[11:12], 4, axis=0))
    assert (m[:, :6] == 255).all() and (m[:10, 6:] == 0).all() and (m[10:] == 255).all()  # 2 px overlap


# -- masks from alpha, edits ------------------------------------------------------------------------------------------
def test_grow_and_shrink_are_disks():
    dot = Image.new("L", (15, 15))
    dot.putpixel((7, 7), 255)
    grown = np.asarray(edit_mask(dot, grow=3)) > 0
    assert grown.sum() == 29  # lattice points within radius 3
    assert np.array_equal(np.asarray(edit_mask(Image.fromarray(np.where(grown, 255, 0).astype(np.uint8)), grow=-3)),
                          np.asarray(dot))
    assert np.array_equal(np.asarray(edit_mask(dot, invert=True)), 255 - np.asarray(dot))


def test_mask_from_alpha_repaints_transparent_pixels():
    rgba = make_image(32, 24).convert("RGBA")
    alpha = np.full((24, 32), 255, np.uint8)
    alpha[5:10, 8:20] = 0
    rgba.putalpha(Image.fromarray(alpha))
    assert np.array_equal(np.asarray(mask_from_alpha(rgba)), 255 - alpha)


def test_cli_keeps_the_picture_like_the_python_api(sd_inpaint_dir, tmp_path):
    image, mask = make_image(W, H), make_mask(W, H, BOX)
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(255 - np.asarray(mask)))  # transparent where the mask is white
    rgba.save(tmp_path / "photo.png")
    out = tmp_path / "out.png"
    assert main(["--model", str(sd_inpaint_dir), "--image", str(tmp_path / "photo.png"), "--prompt", "a cat",
                 "--steps", "2", "--seed", "3", "--no-progress", "--out", str(out), "--preserve-unmasked",
                 "--mask-blur", "1", "--mask-grow", "2", "--crop-to-mask", "8"]) == 0
    pipe = ldm_inpaint.load_pipeline(sd_inpaint_dir)
    expected = pipe("a cat", image=image, mask_image=mask, num_inference_steps=2, generator=gen(3),
                    preserve_unmasked=True, mask_blur=1, mask_grow=2, padding_mask_crop=8, progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    assert Image.open(out).text["preserve_unmasked"] == "True"

    assert main(["--model", str(sd_inpaint_dir), "--image", str(tmp_path / "photo.png"), "--prompt", "a cat",
                 "--steps", "1", "--seed", "3", "--no-progress", "--out", str(out), "--outpaint", "8,0,0,0",
                 "--overwrite"]) == 0
    assert Image.open(out).size == (W + 8, H)


# -- bad input ---------------------------------------------------------------------------------------------------------
BAD_CALLS = {
    "negative_crop_padding": (dict(padding_mask_crop=-1), "padding_mask_crop"),
    "crop_with_empty_mask": (dict(padding_mask_crop=8, mask_image=Image.new("L", (W, H))), "empty"),
    "mask_eroded_away": (dict(mask_grow=-20), "empty after mask_grow=-20"),
    "fractional_grow": (dict(mask_grow=1.5), "mask_grow"),
    "negative_blur": (dict(mask_blur=-1), "mask_blur"),
    "preserve_latents": (dict(preserve_unmasked=True, output_type="latent"), "latent"),
    "options_without_mask": (dict(mask_image=None, mask_blur=2), "mask_image"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_options_get_a_clear_error(models, case):
    pipe = models("sd15-4channel")  # 4-channel: runs without a mask too, so the options are what is refused
    kw = dict(image=make_image(W, H), mask_image=make_mask(W, H, BOX), num_inference_steps=1, progress=False)
    overrides, words = BAD_CALLS[case]
    kw.update(overrides)
    with pytest.raises(ValueError, match=words):
        pipe("a cat", **kw)


@pytest.mark.parametrize("sides", [dict(left=-8), dict(), dict(top=2.5)])
def test_bad_outpaint_sizes_get_a_clear_error(sides):
    with pytest.raises(ValueError, match="outpaint"):
        ldm_inpaint.outpaint(None, "a cat", make_image(), **sides)


def test_opaque_alpha_is_an_error():
    with pytest.raises(ValueError, match="no transparent pixel"):
        mask_from_alpha(make_image().convert("RGBA"))
    with pytest.raises(ValueError, match="no alpha channel"):
        mask_from_alpha(make_image())


CLI_BAD = {
    "opaque_rgba_without_mask": ([], "no transparent pixel"),
    "outpaint_negative": (["--outpaint", "0,-8,0,0"], "≥ 0"),
    "outpaint_malformed": (["--outpaint", "8,8"], "four whole numbers"),
    "outpaint_with_mask": (["--outpaint", "8,0,0,0", "--mask", "{d}/mask.png"], "leave out --mask"),
    "eroded_away": (["--mask", "{d}/mask.png", "--mask-grow", "-30"], "empty"),
}


@pytest.mark.parametrize("case", CLI_BAD)
def test_cli_bad_options_exit_2_with_one_line(sd_inpaint_dir, tmp_path, capsys, case):
    make_image(W, H).convert("RGBA").save(tmp_path / "opaque.png")
    make_mask(W, H, BOX).save(tmp_path / "mask.png")
    extra, words = CLI_BAD[case]
    argv = ["--model", str(sd_inpaint_dir), "--image", str(tmp_path / "opaque.png"), "--prompt", "a cat",
            "--steps", "1", "--no-progress", "--out", str(tmp_path / "out.png")]
    assert main(argv + [a.format(d=tmp_path) for a in extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err
    assert not (tmp_path / "out.png").exists()
