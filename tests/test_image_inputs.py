"""Images and masks as users hand them in (issue 18): files too large to decode, EXIF orientation, 16-bit and float
pixels, masks with alpha, channels-first arrays, integer / bool / 0…255-float / NaN values, and the bounds of the
mask edits and the outpaint canvas. Every bad picture is an InputError raised by image.py, naming the argument."""

from __future__ import annotations

import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from conftest import make_image, make_mask
from PIL import Image

import ldm_inpaint
from ldm_inpaint import image as image_module
from ldm_inpaint.checks import InputError
from ldm_inpaint.image import image_size, load_image, preprocess_image, preprocess_mask, to_pil_list
from ldm_inpaint.inpaint import MAX_CANVAS_SIDE, PasteBack, blur_masks, edit_mask, edit_masks, extend_canvas

W, H = 64, 48


def one_line(e: pytest.ExceptionInfo, *words: str) -> None:
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


# -- files ----------------------------------------------------------------------------------------------------------
def png_claiming(path, width: int, height: int):
    """A 1×1 PNG whose header says width × height: opening it must not try to decode that many pixels."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("width, height", [(12000, 9000), (20000, 20000)])  # below and above PIL's own refusal
def test_a_huge_header_is_refused_before_decoding(tmp_path, width, height):
    path = png_claiming(tmp_path / "bomb.png", width, height)
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(InputError) as e:
        warnings.simplefilter("always")
        load_image(path)
    one_line(e, str(path), "megapixels")  # our limit, or PIL's refusal (over twice its own) reported as ours
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]  # ours speaks, not PIL
    assert time.monotonic() - start < 2


def test_the_pixel_limit_can_be_lowered_by_assignment_or_environment(tmp_path, monkeypatch):
    make_image().save(tmp_path / "photo.png")
    assert load_image(tmp_path / "photo.png").size == (W, H)
    monkeypatch.setattr(image_module, "MAX_IMAGE_PIXELS", W * H - 1)
    with pytest.raises(InputError, match="64x48"):
        load_image(tmp_path / "photo.png")
    monkeypatch.setattr(image_module, "MAX_IMAGE_PIXELS", 100_000_000)
    monkeypatch.setenv("LDM_INPAINT_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(InputError, match="LDM_INPAINT_MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "photo.png")
    monkeypatch.setenv("LDM_INPAINT_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(InputError, match="must be a number of pixels"):
        load_image(tmp_path / "photo.png")


def test_missing_and_unreadable_files_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="image file not found"):
        load_image(tmp_path / "nowhere.png")
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(InputError, match="cannot read"):
        load_image(tmp_path / "notes.png")
    make_image(640, 480).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:2000])  # truncated
    with pytest.raises(InputError, match="cannot read"):
        load_image(tmp_path / "cut.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation, turn", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_is_applied(tmp_path, fmt, orientation, turn):
    picture = make_image(W, H)
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation: the camera was held on its side
    path = tmp_path / f"photo.{fmt.lower()}"
    picture.save(path, format=fmt, exif=exif, **({"quality": 100} if fmt == "JPEG" else {}))
    loaded = load_image(path)
    assert loaded.size == (H, W)
    expected = np.asarray(Image.open(path).convert("RGB").transpose(turn), dtype=int)
    assert np.array_equal(np.asarray(loaded, dtype=int), expected)
    if fmt == "PNG":
        assert np.array_equal(np.asarray(loaded), np.asarray(picture.transpose(turn)))


def test_exif_orientation_of_a_mask_too(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    make_mask(W, H).save(tmp_path / "mask.png", exif=exif)
    assert np.array_equal(np.asarray(load_image(tmp_path / "mask.png", "mask")),
                          np.asarray(make_mask(W, H).transpose(Image.Transpose.ROTATE_270)))


# -- bit depth --------------------------------------------------------------------------------------------------------
def gradient16(width=W, height=H) -> np.ndarray:
    return np.tile(np.linspace(0, 65535, width).round().astype(np.uint16), (height, 1))


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    Image.fromarray(gradient16()).save(tmp_path / "deep.png")
    loaded = load_image(tmp_path / "deep.png")
    assert loaded.mode.startswith("I")
    x = preprocess_image(loaded, H, W)
    expected = torch.from_numpy(gradient16() / 65535 * 2 - 1).float()
    assert x.shape == (1, 3, H, W)
    assert (x - expected).abs().max() <= 1 / 255 + 1e-6  # 8 bits kept (PIL's convert would make 99.6 % white)
    m = preprocess_mask(loaded, H, W)[0, 0]
    assert torch.equal(m, torch.from_numpy(gradient16() >= 32768).float())  # white on the right half


def test_16_bit_array_and_tensor_match_the_file(tmp_path):
    Image.fromarray(gradient16()).save(tmp_path / "deep.png")
    from_file = preprocess_image(load_image(tmp_path / "deep.png"), H, W)
    from_array = preprocess_image(gradient16(), H, W)
    from_tensor = preprocess_image(torch.from_numpy(gradient16().astype(np.int32)).to(torch.uint16), H, W)
    assert (from_array - from_file).abs().max() <= 1 / 255
    assert torch.equal(from_array, from_tensor)


def test_pil_modes_i_and_f():
    eight = np.asarray(make_image().convert("L"))
    reference = preprocess_image(Image.fromarray(eight), H, W)
    assert torch.equal(preprocess_image(Image.fromarray(eight.astype(np.int32)), H, W), reference)  # I, 0…255
    sixteen = Image.fromarray(eight.astype(np.int32) * 257)  # I holding 16-bit values, as older PIL reads PNGs
    assert torch.equal(preprocess_image(sixteen, H, W), reference)
    unit = Image.fromarray(eight.astype(np.float32) / 255)  # F in [0, 1]
    assert torch.equal(preprocess_image(unit, H, W), reference)
    with pytest.raises(InputError, match="divide"):
        preprocess_image(Image.fromarray(eight.astype(np.float32)), H, W)  # F on a 0…255 scale


# -- alpha ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["LA", "RGBA", "PA"])
def test_mask_alpha_composites_on_black(mode):
    """White everywhere but transparent outside the box: only the box is repainted."""
    box = np.asarray(make_mask(W, H))
    white = Image.new("RGBA", (W, H), (255, 255, 255, 255))
    white.putalpha(Image.fromarray(box))
    mask = white.convert(mode)
    expected = preprocess_mask(make_mask(W, H), H, W)
    assert torch.equal(preprocess_mask(mask, H, W), expected)
    assert torch.equal(preprocess_mask(mask, 24, 32), preprocess_mask(make_mask(W, H), 24, 32))  # resized
    assert np.array_equal(np.asarray(edit_masks(mask, grow=2)), np.asarray(edit_masks(make_mask(W, H), grow=2)))
    assert np.array_equal(np.asarray(to_pil_list(mask, "L", "mask_image")[0]), box)


def test_half_transparent_mask_is_luminance_times_alpha():
    mask = Image.new("LA", (W, H), (255, 100))  # 255 × 100/255 = 100 < 128: keep
    with pytest.raises(InputError, match="empty"):
        edit_masks(mask)
    assert not preprocess_mask(mask, H, W).any()
    assert preprocess_mask(Image.new("LA", (W, H), (255, 200)), H, W).all()


def test_opaque_rgba_mask_is_read_as_before():
    rgba = make_mask(W, H).convert("RGBA")
    assert torch.equal(preprocess_mask(rgba, 24, 32), preprocess_mask(make_mask(W, H).convert("RGB"), 24, 32))


# -- layout -----------------------------------------------------------------------------------------------------------
def test_channels_first_arrays_are_read_as_channels_last():
    hwc = np.asarray(make_image(W, H))
    mask = np.asarray(make_mask(W, H))
    for a in (hwc, hwc.astype(np.float32) / 255):
        chw = a.transpose(2, 0, 1)
        assert image_size(chw) == image_size(a) == (H, W)
        assert torch.equal(preprocess_image(chw, H, W), preprocess_image(a, H, W))
        assert torch.equal(preprocess_image(chw, 24, 32), preprocess_image(a, 24, 32))
        batch = np.stack([a, a[::-1]])
        assert torch.equal(preprocess_image(batch.transpose(0, 3, 1, 2), H, W), preprocess_image(batch, H, W))
    assert image_size(mask[None]) == (H, W)
    assert torch.equal(preprocess_mask(mask[None], H, W), preprocess_mask(mask, H, W))
    assert torch.equal(preprocess_mask(mask[:, :, None], H, W), preprocess_mask(mask, H, W))


def test_ambiguous_arrays_are_channels_last():
    a = np.zeros((4, 16, 3), np.uint8)  # 4 rows of 16 RGB pixels, or RGBA channels-first of 16 × 3?
    assert image_size(a) == (4, 16)


BAD_SHAPES = {
    "batch_of_2_planes": np.zeros((2, H, W), np.float32),
    "two_channels": np.zeros((H, W, 2), np.float32),
    "one_axis": np.zeros(W, np.float32),
    "five_axes": np.zeros((1, 1, H, W, 3), np.float32),
    "empty": np.zeros((0, W, 3), np.float32),
    "strings": np.full((H, W), "x"),
    "tensor_two_channels": torch.zeros(1, 2, H, W),
    "tensor_empty": torch.zeros(1, 3, 0, W),
    "complex_tensor": torch.zeros(3, H, W, dtype=torch.complex64),
}


@pytest.mark.parametrize("case", BAD_SHAPES)
@pytest.mark.parametrize("name", ["image", "mask_image"])
def test_bad_shapes_name_the_argument(case, name):
    read = preprocess_mask if name == "mask_image" else preprocess_image
    for check in (lambda: image_size(BAD_SHAPES[case], name), lambda: read(BAD_SHAPES[case], H, W, name=name)):
        with pytest.raises(InputError) as e:
            check()
        one_line(e, name)


def test_bad_lists():
    with pytest.raises(InputError, match="empty list"):
        preprocess_image([], H, W)
    with pytest.raises(InputError, match="must all be PIL images"):
        preprocess_image([make_image(), np.asarray(make_image())], H, W)
    with pytest.raises(InputError, match="differ"):
        preprocess_image([np.asarray(make_image()), np.asarray(make_image()).astype(np.float32) / 255], H, W)
    with pytest.raises(InputError, match="load_image"):
        preprocess_image("photo.png", H, W)


# -- values -----------------------------------------------------------------------------------------------------------
def test_integer_and_bool_pixels():
    u8 = np.array(make_image(W, H))
    reference = preprocess_image(u8, H, W)
    assert torch.equal(preprocess_image(u8.astype(np.int64), H, W), reference)  # 0…255 in a wider type
    f = u8.astype(np.float32) / 255
    tensor = torch.from_numpy(u8).permute(2, 0, 1)
    assert torch.allclose(preprocess_image(tensor, H, W), preprocess_image(f, H, W), atol=1e-6)  # /255, not raw
    assert torch.equal(preprocess_image(tensor.to(torch.int32), H, W), preprocess_image(tensor, H, W))
    box = np.asarray(make_mask(W, H)) > 0
    assert torch.equal(preprocess_mask(box, H, W), preprocess_mask(make_mask(W, H), H, W))
    assert torch.equal(preprocess_mask(torch.from_numpy(box), H, W), preprocess_mask(make_mask(W, H), H, W))


BAD_VALUES = {
    "float_0_255": (np.asarray(make_image(W, H)).astype(np.float32), "divide"),
    "tensor_0_255": (torch.from_numpy(np.array(make_image(W, H))).permute(2, 0, 1).float(), "divide"),
    "int_beyond_255": (np.asarray(make_image(W, H)).astype(np.int32) * 4, "uint8"),
    "negative_int": (np.asarray(make_image(W, H)).astype(np.int16) - 128, "uint8"),
    "nan_array": (np.full((H, W, 3), np.nan, np.float32), "NaN"),
    "inf_tensor": (torch.full((3, H, W), float("inf")), "NaN or infinite"),
    "below_minus_one": (np.full((H, W, 3), -3.0), "[-1, 1]"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_image_values(case):
    value, words = BAD_VALUES[case]
    with pytest.raises(InputError) as e:
        preprocess_image(value, H, W)
    one_line(e, "image", words)


@pytest.mark.parametrize("case", ["float_0_255", "nan_array", "inf_tensor", "below_minus_one"])
def test_bad_mask_values_name_the_mask(case):
    value, _ = BAD_VALUES[case]
    value = value[..., 0] if isinstance(value, np.ndarray) else value[:1]
    for read in (lambda: preprocess_mask(value, H, W), lambda: edit_masks(value)):
        with pytest.raises(InputError) as e:
            read()
        one_line(e, "mask_image")


def test_float_ranges_accepted():
    f = np.asarray(make_image(W, H)).astype(np.float32) / 255
    assert torch.allclose(preprocess_image(f * 2 - 1, H, W), preprocess_image(f, H, W), atol=1e-6)  # [-1, 1]
    preprocess_image(np.clip(f * 1.1 - 0.05, -0.05, 1.05), H, W)  # a resize's ringing is not an error
    with pytest.raises(InputError, match="mask_image float values must be in \\[0, 1\\]"):
        preprocess_mask(f[..., 0] * 2 - 1, H, W)  # masks are never in [-1, 1]


# -- the pipeline: the argument is named, and an empty mask stops the run ----------------------------------------------
@pytest.fixture(scope="module")
def pipe(sd_inpaint_dir):
    return ldm_inpaint.load_pipeline(sd_inpaint_dir)


def call(pipe, **kw):
    args = dict(image=make_image(), mask_image=make_mask(), num_inference_steps=1, progress=False, output_type="np",
                generator=torch.Generator().manual_seed(0))
    return pipe("a cat", **{**args, **kw}).images


def test_pipeline_reads_channels_first_arrays_like_pil(pipe):
    expected = call(pipe)
    image = np.asarray(make_image()).transpose(2, 0, 1)
    mask = np.asarray(make_mask())[None]
    assert np.array_equal(call(pipe, image=image, mask_image=mask), expected)


@pytest.mark.parametrize("kw, words", [
    (dict(mask_image=Image.new("L", (W, H))), ["mask_image is empty", "black", "img2img"]),
    (dict(mask_image=np.zeros((H, W), np.float32), padding_mask_crop=4), ["mask_image is empty"]),
    (dict(mask_image=[make_mask(), Image.new("L", (W, H))], image=[make_image(), make_image(seed=1)]),
     ["mask_image 2 of 2 is empty"]),
    (dict(mask_image=Image.new("L", (W, H), 255), invert_mask=True), ["all white", "invert_mask"]),
    (dict(mask_image=np.full((H, W), np.nan, np.float32)), ["mask_image", "NaN"]),
    (dict(image=np.asarray(make_image()).astype(np.float32)), ["image float values", "divide"]),
])
def test_pipeline_names_the_bad_picture(pipe, kw, words):
    with pytest.raises(InputError) as e:
        call(pipe, **kw)
    one_line(e, *words)


def test_inverted_black_mask_repaints_everything(pipe):
    assert np.array_equal(call(pipe, mask_image=Image.new("L", (W, H)), invert_mask=True),
                          call(pipe, mask_image=Image.new("L", (W, H), 255)))


# -- bounds of the mask edits and the canvas --------------------------------------------------------------------------
def test_mask_grow_is_bounded_by_the_mask():
    start = time.monotonic()
    with pytest.raises(InputError) as e:
        edit_masks(make_mask(), grow=1_000_000)
    one_line(e, "mask_grow", "at most ±64")
    with pytest.raises(InputError, match="mask_grow"):
        edit_mask(make_mask(), grow=-1_000_000)
    assert time.monotonic() - start < 1
    assert (np.asarray(edit_mask(make_mask(), grow=W)) == 255).all()  # the largest grow fills a 64×48 mask
    with pytest.raises(InputError, match="mask_grow must be a whole number"):
        edit_masks(make_mask(), grow=1.5)


@pytest.mark.parametrize("blur, words", [(1e30, "at most 64"), (float("nan"), "finite"), (-1, "≥ 0"),
                                         ("2", "a number")])
def test_mask_blur_is_bounded(blur, words):
    with pytest.raises(InputError) as e:
        blur_masks(make_mask(), blur)
    one_line(e, "mask_blur", words)
    with pytest.raises(InputError, match="mask_blur"):
        PasteBack.build(make_image(), make_mask(), True, blur)


def test_largest_blur_and_feather_are_quick():
    start = time.monotonic()
    blur_masks(make_mask(), W)
    PasteBack.build(make_image(), make_mask(), True, W)  # a feather of 4·64 + 2 px: its distance stops at the diagonal
    assert time.monotonic() - start < 2


def test_huge_outpaint_fails_before_allocating():
    start = time.monotonic()
    for sides in (dict(right=100_000_000), dict(left=MAX_CANVAS_SIDE), dict(top=MAX_CANVAS_SIDE - H + 1)):
        with pytest.raises(InputError) as e:
            extend_canvas(make_image(), **{**dict(left=0, top=0, right=0, bottom=0), **sides})
        one_line(e, "outpaint", str(MAX_CANVAS_SIDE))
    assert time.monotonic() - start < 1
    assert extend_canvas(make_image(), 0, 0, np.int64(8), 0, overlap=2)[0].size == (W + 8, H)  # numpy ints are fine
    with pytest.raises(InputError, match="outpaint extends one image"):
        ldm_inpaint.outpaint(None, "a cat", [make_image(), make_image()], right=8)


def test_huge_crop_padding_is_the_whole_image():
    paste = PasteBack.build(make_image(), make_mask(), False, 0)
    image, mask = paste.crop(make_image(), make_mask(), W, H, 100_000_000)
    assert paste.box == (0, 0, W, H) and image.size == (W, H)
    with pytest.raises(InputError, match="padding_mask_crop must be ≥ 0"):
        paste.crop(make_image(), make_mask(), W, H, -1)
