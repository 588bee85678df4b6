"""Pixels in and out: PIL / numpy / torch images and masks ⇄ the tensors the pipeline works on. Also the one place
where pictures are checked: every bad image or mask is an `InputError` raised here, naming `image` or `mask_image`.

Conventions follow diffusers' VaeImageProcessor so that the same inputs give the same tensors: PIL inputs are
resized with Lanczos (the mask before its grayscale conversion), arrays and tensors with nearest-neighbour;
images go to [-1, 1]; masks are binarised at 0.5 with 1 = repaint, 0 = keep. Where diffusers has no convention
(or a broken one), these are the rules:

- Files: `load_image` refuses more than `MAX_IMAGE_PIXELS` pixels, read from the header before anything is
  decoded, and turns the picture upright by its EXIF orientation, as diffusers' `load_image` does.
- Values: uint8 is 0…255; other integer types holding 0…255 are 8-bit too; uint16 (and PIL I;16) is 0…65535,
  scaled rather than clipped as PIL's `convert` would; bool is 0/1. Floats (and PIL mode F) are in [0, 1]; images
  may also be in [-1, 1]. Floats may stray past these ranges by `OVERSHOOT` (the ringing of a resize, an unclamped
  decode). Floats on a 0…255 scale, NaN and infinities are refused.
- Alpha: a mask with transparency counts as luminance × alpha, composited on black, so transparent means keep.
  An image's alpha is dropped; the command line turns a transparent image into the mask (inpaint.mask_from_alpha).
- Layout: arrays are (H, W), (H, W, C) or (B, H, W, C), or channels-first (C, H, W), (B, C, H, W), with C = 1, 3
  or 4. If both readings fit, channels-last wins, as in diffusers, so (3, 8, 3) is 3 rows of 8 RGB pixels.
  Tensors are (H, W), (C, H, W) or (B, C, H, W).
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError

from .checks import InputError, number

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, Sequence[Image.Image]]

VAE_SCALE = 8  # pixels per latent cell; sizes are rounded down to a multiple of it
# The most pixels load_image decodes: a 100-megapixel photo still loads (padding_mask_crop inpaints a box of it),
# a file whose header claims 20000 × 20000 does not. Assign to change it, or set the environment variable.
MAX_IMAGE_PIXELS = 100_000_000
ENV_MAX_PIXELS = "LDM_INPAINT_MAX_IMAGE_PIXELS"
CHANNELS = (1, 3, 4)  # gray, RGB, RGBA
OVERSHOOT = 0.5  # how far float pixels may stray past their range; a 0…255 picture strays much farther


# -- files --------------------------------------------------------------------------------------------------------
def max_image_pixels() -> int:
    """$LDM_INPAINT_MAX_IMAGE_PIXELS when set, else MAX_IMAGE_PIXELS."""
    text = os.environ.get(ENV_MAX_PIXELS)
    if not text:
        return MAX_IMAGE_PIXELS
    try:
        return int(number(float(text), ENV_MAX_PIXELS, low=1))
    except ValueError as e:
        raise InputError(f"{ENV_MAX_PIXELS}={text!r} must be a number of pixels, such as 100000000") from e


def load_image(path: str | os.PathLike, name: str = "image") -> Image.Image:
    """Open an image file fully, so that a bad file fails here, with its name, not later. Its size is checked
    against `max_image_pixels()` from the header, before any pixel is decoded; it is turned upright by its EXIF
    orientation."""
    if not os.path.isfile(path):
        raise InputError(f"{name} file not found: {path}")
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit (89 Mpx) and refuses twice that when opening; the limit here rules
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size  # Image.open reads only the header
                if w * h > limit:
                    raise InputError(f"{name} {path} is {w}x{h} = {w * h / 1e6:.0f} megapixels, more than the "
                                     f"{limit / 1e6:g} this reads; give a smaller picture, or raise the limit "
                                     f"with {ENV_MAX_PIXELS}")
                im.load()
                return ImageOps.exif_transpose(im)  # a copy, upright
    except Image.DecompressionBombError as e:
        raise InputError(f"{name} {path} is more than the {limit / 1e6:g} megapixels this reads ({e}); give a "
                         "smaller picture") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InputError(f"cannot read {path} as an image ({e}); give a PNG or JPEG file") from e


# -- checks: which pictures, what shape ----------------------------------------------------------------------------
def _as_list(image: ImageInput, name: str) -> list:
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise InputError(f"{name} is an empty list; give at least one picture")
    kinds = {next((k for k in (Image.Image, np.ndarray, torch.Tensor) if isinstance(i, k)), None) for i in items}
    if None in kinds:
        bad = next(i for i in items if not isinstance(i, (Image.Image, np.ndarray, torch.Tensor)))
        hint = " (a file path: open it with ldm_inpaint.image.load_image)" if isinstance(bad, (str, os.PathLike)) \
            else ""
        raise InputError(f"{name} of type {type(bad).__name__} is not a picture; give a PIL image, numpy array or "
                         f"tensor, or a list of them{hint}")
    if len(kinds) > 1:
        raise InputError(f"the pictures of {name} must all be PIL images, all numpy arrays or all tensors")
    return items


def _array_layout(a: np.ndarray, name: str) -> str:
    """How an array's axes are read: "HW", "HWC", "CHW", "BHWC" or "BCHW". The one decision for both its size
    and its pixels: channels-last when the last axis can be channels, else channels-first when the third-last can."""
    if a.dtype.kind not in "biuf":
        raise InputError(f"{name} array has dtype {a.dtype}; give uint8 pixels, or floats in [0, 1]")
    if a.size == 0:
        raise InputError(f"{name} array of shape {a.shape} is empty")
    if a.ndim == 2:
        return "HW"
    if a.ndim in (3, 4) and (a.shape[-1] in CHANNELS or a.shape[-3] in CHANNELS):
        return ("B" if a.ndim == 4 else "") + ("HWC" if a.shape[-1] in CHANNELS else "CHW")
    raise InputError(f"{name} array of shape {a.shape} is not a picture: give (H, W), (H, W, C) or (B, H, W, C) "
                     "with C = 1, 3 or 4 channels, or channels-first (C, H, W)")


def _check_tensor(x: torch.Tensor, name: str) -> None:
    if x.dtype.is_complex:
        raise InputError(f"{name} tensor has dtype {x.dtype}; give floats in [0, 1] or [-1, 1]")
    if x.numel() == 0:
        raise InputError(f"{name} tensor of shape {tuple(x.shape)} is empty")
    if x.ndim != 2 and not (x.ndim in (3, 4) and x.shape[-3] in CHANNELS):
        raise InputError(f"{name} tensor of shape {tuple(x.shape)} is not a picture: give (C, H, W) or "
                         "(B, C, H, W) with C = 1, 3 or 4 channels, or (H, W)")


def image_size(image: ImageInput, name: str = "image") -> tuple[int, int]:
    """(height, width) of the first picture of the input; its type and shape are checked."""
    first = _as_list(image, name)[0]
    if isinstance(first, Image.Image):
        return first.height, first.width
    if isinstance(first, np.ndarray):
        hw = first.shape[-3:-1] if _array_layout(first, name).endswith("HWC") else first.shape[-2:]
    else:
        _check_tensor(first, name)
        hw = first.shape[-2:]
    return int(hw[0]), int(hw[1])


def round_size(height: int, width: int) -> tuple[int, int]:
    """Round down to a multiple of 8, as diffusers does; refuse sizes that vanish."""
    h, w = height - height % VAE_SCALE, width - width % VAE_SCALE
    if h < VAE_SCALE or w < VAE_SCALE:
        raise InputError(f"size {height}x{width} is too small: height and width must be at least {VAE_SCALE} px")
    return h, w


# -- checks: pixel values --------------------------------------------------------------------------------------
def _check_floats(finite: bool, lo: float, hi: float, name: str, low: float) -> None:
    """Floats must be finite and within [low, 1], give or take OVERSHOOT."""
    if not finite:
        raise InputError(f"{name} contains NaN or infinite values; give finite pixel values")
    if lo < low - OVERSHOOT or hi > 1 + OVERSHOOT:
        wanted = "[0, 1]" if low == 0 else "[0, 1] or [-1, 1]"
        hint = "; divide 0…255 values by 255" if hi > 1 + OVERSHOOT else ""
        raise InputError(f"{name} float values must be in {wanted}, got {lo:g}…{hi:g}{hint}")


def _check_8bit(lo: int, hi: int, dtype, name: str) -> None:
    if lo < 0 or hi > 255:
        raise InputError(f"{name} has {dtype} values {lo}…{hi}, not 8-bit pixels; give uint8 (0…255), uint16, "
                         "or floats in [0, 1]")


def _array_values(a: np.ndarray, name: str, low: float) -> np.ndarray:
    """8-bit pixels as uint8, others as float32 checked against [low, 1]."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype == np.uint16:  # 16-bit pixels: scaled, not clipped
        return a.astype(np.float32) / 65535
    if a.dtype.kind in "iu":
        _check_8bit(int(a.min()), int(a.max()), a.dtype, name)
        return a.astype(np.uint8)
    _check_floats(bool(np.isfinite(a).all()), float(a.min()), float(a.max()), name, low)
    return a.astype(np.float32)


def _tensor_values(x: torch.Tensor, name: str, low: float) -> torch.Tensor:
    """float32 in [0, 1] (or [-1, 1] with low = -1), by the same rules as arrays."""
    x = x.detach()
    if x.dtype == torch.bool:
        return x.float()
    if x.dtype == torch.uint16:
        return x.float() / 65535
    if not x.is_floating_point():
        dtype, x = x.dtype, x.to(torch.int64)  # torch has no min/max for the wider unsigned types
        _check_8bit(int(x.min()), int(x.max()), dtype, name)
        return x.float() / 255
    _check_floats(bool(torch.isfinite(x).all()), float(x.min()), float(x.max()), name, low)
    return x.float()


def has_alpha(image: Image.Image) -> bool:
    """Whether the PIL image has transparency: an alpha channel, or a transparent colour (P, L, RGB)."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def normalize_pil(im: Image.Image, mode: str, name: str) -> Image.Image:
    """A PIL picture as the pipeline reads it (mode "RGB" for an image, "L" for a mask): 16-bit and float pixels
    scaled to 8 bits, a mask with transparency composited on black. Other pictures come back as they are, so
    that their resize and conversion stay diffusers'."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im)
        if im.mode == "F":
            _check_floats(bool(np.isfinite(a).all()), float(a.min()), float(a.max()), name, 0.0)
            a = np.clip(a, 0, 1) * 255
        else:
            if a.min() < 0 or a.max() > 65535:
                raise InputError(f"{name} (PIL mode {im.mode}) has values {a.min()}…{a.max()}, beyond 16 bits; "
                                 "give 8- or 16-bit pixels")
            if im.mode.startswith("I;16") or a.max() > 255:  # mode I holds 16-bit files in older PIL, TIFF
                a = a / 257
        im = Image.fromarray(np.round(a).astype(np.uint8))
    if mode == "L" and has_alpha(im):
        rgba = (im.convert("LA") if im.mode == "La" else im).convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema()[0] < 255:  # fully opaque masks keep diffusers' path
            im = ImageChops.multiply(rgba.convert("L"), alpha)
    return im


def _pictures(image: ImageInput, name: str, mode: str) -> list[Image.Image] | torch.Tensor:
    """The input checked, as a list of 8-bit PIL pictures (PIL inputs, and 8-bit arrays, which then get the
    Lanczos resize users expect) or as one float32 tensor (B, C, H, W) in [0, 1] (or [-1, 1] for images)."""
    items, low = _as_list(image, name), (0.0 if mode == "L" else -1.0)
    if isinstance(items[0], Image.Image):
        return [normalize_pil(i, mode, name) for i in items]
    if isinstance(items[0], np.ndarray):
        arrays = []
        for a in items:  # → (B, H, W, C)
            layout = _array_layout(a, name)
            a = a[:, :, None] if layout == "HW" else a
            a = a if a.ndim == 4 else a[None]
            arrays.append(a.transpose(0, 2, 3, 1) if layout.endswith("CHW") else a)
        _same_kind(arrays, name)
        arr = _array_values(np.concatenate(arrays), name, low)
        if arr.dtype == np.uint8:
            return [normalize_pil(Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a), mode, name)
                    for a in arr]
        return torch.from_numpy(arr).permute(0, 3, 1, 2)
    for x in items:
        _check_tensor(x, name)
    tensors = [x if x.ndim == 4 else x.reshape(1, -1, *x.shape[-2:]) for x in items]  # → (B, C, H, W)
    _same_kind(tensors, name)
    return _tensor_values(torch.cat(tensors), name, low)


def _same_kind(batches: list, name: str) -> None:
    """The pictures of a list, each (B, …), must concatenate: the same size, channels and dtype."""
    kinds = [(tuple(b.shape[1:]), str(b.dtype)) for b in batches]
    if len(set(kinds)) > 1:
        listed = ", ".join(f"{shape} {dtype}" for shape, dtype in kinds)
        raise InputError(f"the pictures of {name} differ ({listed}); give them all the same shape and dtype")


# -- conversions ------------------------------------------------------------------------------------------------
def to_pil_list(image: ImageInput, mode: str, name: str) -> list[Image.Image]:
    """Each picture of the input, checked, as a PIL image in `mode` at its own size (for the mask edits, crops and
    paste-back of inpaint.py). Floats are rounded to 8 bits; a tensor in [-1, 1] is read as the pipeline reads it."""
    pictures = _pictures(image, name, mode)
    if isinstance(pictures, list):
        return [p if p.mode == mode else p.convert(mode) for p in pictures]
    x = pictures
    x = (x + 1) / 2 if mode == "RGB" and x.min() < 0 else x  # an image in [-1, 1]; masks are never shifted
    arrays = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)
    return [normalize_pil(Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a), mode, name).convert(mode)
            for a in arrays]


def _pil_to_array(im: Image.Image, height: int, width: int, mode: str) -> np.ndarray:
    if im.size != (width, height):
        im = im.resize((width, height), resample=Image.LANCZOS)
    # RGBA, P … all become what the model sees; a mask is made grayscale only after the resize
    return np.asarray(im.convert(mode), dtype=np.float32) / 255.0


def _to_unit_tensor(image: ImageInput, height: int, width: int, mode: str, name: str) -> torch.Tensor:
    """(B, C, H, W) float32 in [0, 1] (or [-1, 1] for images already normalised)."""
    pictures = _pictures(image, name, mode)
    if isinstance(pictures, list):
        x = torch.from_numpy(np.stack([_pil_to_array(p, height, width, mode) for p in pictures]))
        # a permuted view, not a copy: the VAE then runs channels-last from its first conv, as in diffusers,
        # whose kernels (and rounding) this reproduces
        return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = pictures
    if mode == "L" and x.shape[1] != 1:
        gray = x[:, :3].mean(dim=1, keepdim=True)
        x = gray * x[:, 3:] if x.shape[1] == 4 else gray  # RGBA: luminance × alpha, as for PIL masks
    if mode == "RGB" and x.shape[1] != 3:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width))  # nearest, as diffusers does for arrays and tensors
    return x


def preprocess_image(image: ImageInput, height: int, width: int, name: str = "image") -> torch.Tensor:
    """Image(s) → (B, 3, H, W) float32 in [-1, 1]."""
    x = _to_unit_tensor(image, height, width, "RGB", name)
    return x if x.min() < 0 else 2.0 * x - 1.0  # a tensor already in [-1, 1] is taken as it is


def preprocess_mask(mask: ImageInput, height: int, width: int, name: str = "mask_image") -> torch.Tensor:
    """Mask(s) → (B, 1, H, W) float32 of 0 (keep) and 1 (repaint): white or ≥ 0.5 means repaint."""
    m = _to_unit_tensor(mask, height, width, "L", name)
    return (m >= 0.5).to(torch.float32)


def postprocess(x: torch.Tensor, output_type: str):
    """Decoder output in [-1, 1] (B, 3, H, W) → list of PIL images or a float array (B, H, W, 3) in [0, 1]."""
    x = (x * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return x
    return [Image.fromarray(a) for a in (x * 255).round().astype(np.uint8)]
