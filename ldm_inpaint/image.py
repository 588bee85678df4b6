"""Pixels in and out: PIL / numpy / torch images and masks ⇄ the tensors the pipeline works on.

Conventions follow diffusers' VaeImageProcessor so that the same inputs give the same tensors: PIL inputs are
resized with Lanczos (the mask before its grayscale conversion), arrays and tensors with nearest-neighbour;
images go to [-1, 1]; masks are binarised at 0.5 with 1 = repaint, 0 = keep.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, Sequence[Image.Image]]

VAE_SCALE = 8  # pixels per latent cell; sizes are rounded down to a multiple of it


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully (so a bad file fails here, with its name, not later)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read {path} as an image ({e}); give a PNG or JPEG file") from e


def _as_list(image: ImageInput) -> list:
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("empty list of images")
        return list(image)
    return [image]


def image_size(image: ImageInput) -> tuple[int, int]:
    """(height, width) of the first image of the input."""
    first = _as_list(image)[0]
    if isinstance(first, Image.Image):
        return first.height, first.width
    if isinstance(first, np.ndarray):  # (H, W[, C]) or (B, H, W, C)
        return first.shape[-3:-1] if first.ndim >= 3 and first.shape[-1] in (1, 3, 4) else first.shape[-2:]
    if isinstance(first, torch.Tensor):  # (C, H, W) or (B, C, H, W)
        return tuple(first.shape[-2:])
    raise TypeError(f"unsupported image type {type(first).__name__}; give a PIL image, numpy array or tensor")


def round_size(height: int, width: int) -> tuple[int, int]:
    """Round down to a multiple of 8, as diffusers does; refuse sizes that vanish."""
    h, w = height - height % VAE_SCALE, width - width % VAE_SCALE
    if h < VAE_SCALE or w < VAE_SCALE:
        raise ValueError(f"size {height}x{width} is too small: height and width must be at least {VAE_SCALE} px")
    return h, w


def _pil_to_array(im: Image.Image, height: int, width: int, mode: str) -> np.ndarray:
    if im.size != (width, height):
        im = im.resize((width, height), resample=Image.LANCZOS)
    # RGBA, P, I;16 … all become what the model sees; a mask is made grayscale only after the resize
    return np.asarray(im.convert(mode), dtype=np.float32) / 255.0


def _to_unit_tensor(image: ImageInput, height: int, width: int, mode: str) -> torch.Tensor:
    """(B, C, H, W) float32 in [0, 1] (or [-1, 1] for tensors already normalised)."""
    items = _as_list(image)
    if all(isinstance(i, Image.Image) for i in items):
        arrays = [_pil_to_array(i, height, width, mode) for i in items]
        x = torch.from_numpy(np.stack(arrays))
        # a permuted view, not a copy: the VAE then runs channels-last from its first conv, as in diffusers,
        # whose kernels (and rounding) this reproduces
        return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if all(isinstance(i, np.ndarray) for i in items):
        arrays = [a if a.ndim == 4 else a[None] for a in
                  (i[..., None] if i.ndim == 2 else i for i in items)]  # → (B, H, W, C)
        arr = np.concatenate(arrays)
        if arr.dtype == np.uint8:  # 8-bit pixels: the PIL path gives the Lanczos resize users expect
            return _to_unit_tensor([Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in arr],
                                   height, width, mode)
        x = torch.from_numpy(arr.astype(np.float32)).permute(0, 3, 1, 2)
    elif all(isinstance(i, torch.Tensor) for i in items):
        x = torch.cat([i if i.ndim == 4 else i.reshape(1, -1, *i.shape[-2:]) for i in items]).float()
    else:
        raise TypeError("images must all be PIL images, all numpy arrays or all tensors")
    if mode == "L" and x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True) if x.shape[1] == 3 else x[:, :1]
    if mode == "RGB" and x.shape[1] != 3:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width))  # nearest, as diffusers does for arrays and tensors
    return x


def preprocess_image(image: ImageInput, height: int, width: int) -> torch.Tensor:
    """Image(s) → (B, 3, H, W) float32 in [-1, 1]."""
    x = _to_unit_tensor(image, height, width, "RGB")
    return x if x.min() < 0 else 2.0 * x - 1.0  # a tensor already in [-1, 1] is taken as it is


def preprocess_mask(mask: ImageInput, height: int, width: int) -> torch.Tensor:
    """Mask(s) → (B, 1, H, W) float32 of 0 (keep) and 1 (repaint): white or ≥ 0.5 means repaint."""
    m = _to_unit_tensor(mask, height, width, "L")
    return (m >= 0.5).to(torch.float32)


def postprocess(x: torch.Tensor, output_type: str):
    """Decoder output in [-1, 1] (B, 3, H, W) → list of PIL images or a float array (B, H, W, 3) in [0, 1]."""
    x = (x * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return x
    return [Image.fromarray(a) for a in (x * 255).round().astype(np.uint8)]
