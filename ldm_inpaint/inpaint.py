"""Inpainting that respects the picture: mask edits, "only masked" crops, paste-back and outpainting.

Everything here works on PIL images at the input's own resolution, before and after the pipeline runs:

    edit_mask        invert, grow (dilate) or shrink (erode) the mask
    blur_mask        Gaussian blur, as diffusers' `VaeImageProcessor.blur` (PIL GaussianBlur)
    mask_from_alpha  transparent pixels of an RGBA image = repaint
    crop_region      the box around the mask that `padding_mask_crop` inpaints (diffusers' `get_crop_region`)
    resize_fill      the crop resized to the working size, edges stretched into the margin (resize_mode "fill")
    PasteBack        the generated pixels composited into the original picture, hard (diffusers' `apply_overlay`)
                     or feathered so that pixels away from the mask are returned untouched (`preserve_unmasked`)
    outpaint         a larger canvas, its new border edge-extended and masked, inpainted

The crop and overlay conventions (box arithmetic, resize modes, which mask is the overlay's alpha) are those of
diffusers 0.42.1 `src/diffusers/image_processor.py` (`get_crop_region`, `_resize_and_fill`, `_resize_and_crop`,
`apply_overlay`), so `padding_mask_crop` gives diffusers' image for the same seed; see docs/inpainting.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .checks import InputError, number
from .image import VAE_SCALE, ImageInput, has_alpha, normalize_pil, to_pil_list

OUTPAINT_OVERLAP = 8  # px of the original picture repainted along each extended side, so the seam is generated
# The largest side of an outpainted canvas, px: checked before the canvas is allocated (16384² RGB is 0.8 GB;
# checks.check_memory then tells whether the pipeline can run it at all).
MAX_CANVAS_SIDE = 16384


def _binary(mask: Image.Image) -> np.ndarray:
    """True = repaint, at the pipeline's threshold (≥ 0.5)."""
    return np.asarray(mask.convert("L")) >= 128


# -- mask edits -------------------------------------------------------------------------------------------------
def distance_to(mask: np.ndarray, limit: int) -> np.ndarray:
    """Euclidean distance (px) from every pixel to the nearest True pixel of `mask` (H, W), exact up to `limit`;
    farther pixels get some value > limit (or inf). Two separable passes of shifted minima — along the rows,
    then down the columns (d² = min over dy of dy² + row distance²) — so the cost is O(limit · H · W). No
    distance within the array exceeds its diagonal, so a larger limit changes nothing but the cost."""
    h, w = mask.shape
    limit = min(limit, math.ceil(math.hypot(h, w)))
    padded = np.pad(mask, ((0, 0), (limit, limit)))
    row = np.full((h, w), np.inf, dtype=np.float32)  # distance to the nearest mask pixel in the same row
    for s in range(-limit, limit + 1):
        row = np.where(padded[:, limit + s:limit + s + w], np.minimum(row, abs(s)), row)
    padded = np.pad(row * row, ((limit, limit), (0, 0)), constant_values=np.inf)
    d2 = np.full((h, w), np.inf, dtype=np.float32)
    for s in range(-limit, limit + 1):
        d2 = np.minimum(d2, s * s + padded[limit + s:limit + s + h])
    return np.sqrt(d2)


def edit_mask(mask: Image.Image, invert: bool = False, grow: int = 0) -> Image.Image:
    """Invert (white ⇄ black) and grow by `grow` px (a disk dilation; negative erodes). Either edit binarises
    the mask at 0.5 first; with neither, the mask is returned as it is, so default outputs keep diffusers' parity.
    An empty mask after a grow is an error: there would be nothing to repaint. So is a grow by more than the
    mask's larger side: it makes the mask all white (or empty), and costs time in proportion."""
    grow = number(grow, "mask_grow", integer=True)
    if abs(grow) > max(mask.size):
        raise InputError(f"mask_grow={grow} is more than the mask's larger side ({mask.width}x{mask.height}); give "
                         f"at most ±{max(mask.size)} px")
    if not invert and grow == 0:
        return mask
    m = _binary(mask)
    if invert:
        m = ~m
    if grow > 0:
        m = distance_to(m, grow) <= grow
    elif grow < 0:
        m = ~(distance_to(~m, -grow) <= -grow)  # keep only pixels farther than |grow| from every kept pixel
    if grow != 0 and not m.any():
        raise InputError(f"the mask is empty after mask_grow={grow}: nothing is left to repaint; "
                         "erode less, or give a mask with white pixels")
    return Image.fromarray(np.where(m, 255, 0).astype(np.uint8))


def edit_masks(masks: ImageInput, invert: bool = False, grow: int = 0) -> ImageInput:
    """Check the mask(s), then `edit_mask` each; without edits the input comes back untouched. A mask with
    nothing to repaint is an error before any edit, rather than a full run that changes nothing."""
    grow = number(grow, "mask_grow", integer=True)
    pictures = to_pil_list(masks, "L", "mask_image")
    for i, m in enumerate(pictures):
        if (_binary(m) != invert).any():
            continue
        which = "mask_image" if len(pictures) == 1 else f"mask_image {i + 1} of {len(pictures)}"
        if invert:
            raise InputError(f"{which} is all white, so with invert_mask it leaves nothing to repaint; black marks "
                             "what to repaint when inverted")
        raise InputError(f"{which} is empty (all black: nothing to repaint); white marks what to repaint, or "
                         "leave the mask out for img2img")
    if not invert and grow == 0:
        return masks
    edited = [edit_mask(m, invert, grow) for m in pictures]
    return edited if len(edited) > 1 else edited[0]


def blur_masks(masks: ImageInput, radius: float) -> ImageInput:
    if number(radius, "mask_blur", low=0) == 0:
        return masks
    blurred = [blur_mask(m, radius) for m in to_pil_list(masks, "L", "mask_image")]
    return blurred if len(blurred) > 1 else blurred[0]


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    """Gaussian blur of standard deviation `radius` px (PIL's GaussianBlur, as diffusers'
    `mask_processor.blur(mask, blur_factor=radius)`); the pipeline then binarises it at 0.5 for the model, so
    the blur rounds the mask's corners, and the overlay of `padding_mask_crop` uses it as a soft alpha."""
    radius = check_blur(radius, mask)
    return mask if radius == 0 else mask.convert("L").filter(ImageFilter.GaussianBlur(radius))


def check_blur(radius: float, mask: Image.Image) -> float:
    """mask_blur as a float, at most the mask's larger side: a wider blur only washes the mask out (and PIL
    overflows on huge radii)."""
    radius = number(radius, "mask_blur", low=0)
    if radius > max(mask.size):
        raise InputError(f"mask_blur={radius:g} is wider than the mask ({mask.width}x{mask.height}); give at most "
                         f"{max(mask.size)} px")
    return radius


def mask_from_alpha(image: Image.Image) -> Image.Image:
    """The repaint mask of an image with an alpha channel: transparent = repaint (white), opaque = keep.
    Raises InputError if the image has no alpha channel or no pixel that is even partly transparent."""
    if not has_alpha(image):
        raise InputError(f"the image (mode {image.mode}) has no alpha channel to take a mask from; give a mask")
    alpha = np.asarray(image.convert("RGBA").getchannel("A"))
    if alpha.min() == 255:
        raise InputError("the image has an alpha channel but no transparent pixel, so it marks nothing to "
                         "repaint: make the area to repaint transparent, or give a mask")
    return Image.fromarray(255 - alpha)


# -- "only masked": the crop, and the resizes in and out of it ----------------------------------------------------
def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the bounding box of the mask's non-zero pixels, padded by `pad` and clamped to the
    image, then widened (or heightened) about its centre to the working aspect width/height and shifted back
    inside the image; a box that cannot fit stays clamped. diffusers' `get_crop_region`, integer for integer."""
    m = np.asarray(mask.convert("L")) > 0
    if not m.any():
        raise InputError("padding_mask_crop needs a mask with something to repaint; this one is empty")
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    h, w = m.shape
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _widen(y1, y2, (x2 - x1) / ratio, h)
    else:
        x1, x2 = _widen(x1, x2, (y2 - y1) * ratio, w)
    return x1, y1, x2, y2


def _widen(lo: int, hi: int, want: float, size: int) -> tuple[int, int]:
    grow = int(want - (hi - lo))  # truncated, as diffusers
    lo, hi = lo - grow // 2, hi + grow - grow // 2
    if hi > size:  # shift back inside …
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)  # … and clamp what still does not fit


def resize_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Fit inside width × height keeping the aspect (Lanczos), centred; the margins on the two short sides are
    filled by stretching the picture's outermost line across them (diffusers' resize_mode "fill"). PIL samples
    that line with a zero-thickness box, i.e. Lanczos-weighted from the last rows, not a plain copy of one."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    top, left = height // 2 - src_h // 2, width // 2 - src_w // 2
    out.paste(resized, (left, top))
    if ratio < src_ratio and top > 0:  # bands above and below
        out.paste(resized.resize((width, top), box=(0, 0, width, 0)), (0, 0))
        out.paste(resized.resize((width, top), box=(0, src_h, width, src_h)), (0, top + src_h))
    elif ratio > src_ratio and left > 0:  # bands left and right
        out.paste(resized.resize((left, height), box=(0, 0, 0, height)), (0, 0))
        out.paste(resized.resize((left, height), box=(src_w, 0, src_w, height)), (left + src_w, 0))
    return out


def resize_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover width × height keeping the aspect (Lanczos) and cut the centre (resize_mode "crop")."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    left, top = src_w // 2 - width // 2, src_h // 2 - height // 2
    return resized.crop((left, top, left + width, top + height))


def crop_and_fill(image: Image.Image, box: tuple[int, int, int, int], width: int, height: int) -> Image.Image:
    return resize_fill(image.crop(box), width, height)


# -- paste-back ------------------------------------------------------------------------------------------------
def feather_width(mask_blur: float) -> float:
    """Where preserve_unmasked's blend weight reaches zero, in px from the mask."""
    return 4 * mask_blur + 2


def feather(mask: Image.Image, width: float) -> np.ndarray:
    """Weight (H, W) of the generated pixels: 1 on the mask, falling smoothly (smoothstep of the Euclidean
    distance) to exactly 0 at `width` px from it and beyond."""
    m = _binary(mask)
    alpha = np.zeros(m.shape, dtype=np.float32)
    if not m.any():
        return alpha
    limit = math.ceil(width)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    y0, y1 = max(rows[0] - limit, 0), rows[-1] + 1 + limit  # only the mask's neighbourhood can be non-zero
    x0, x1 = max(cols[0] - limit, 0), cols[-1] + 1 + limit
    t = np.clip(1 - distance_to(m[y0:y1, x0:x1], limit) / width, 0, 1)
    alpha[y0:y1, x0:x1] = t * t * (3 - 2 * t)
    return alpha


def composite(original: Image.Image, generated: Image.Image, keep: Image.Image) -> Image.Image:
    """The original laid over the generated picture with opacity `keep` (mode L, 255 = original). The original
    is faded in premultiplied alpha (RGBa) and alpha-composited, which rounds exactly as diffusers'
    `apply_overlay`; where keep is 255 the original's bytes come back unchanged, where it is 0 the generated."""
    faded = Image.new("RGBa", original.size)
    faded.paste(original.convert("RGBA").convert("RGBa"), mask=keep)
    out = generated.convert("RGBA")
    out.alpha_composite(faded.convert("RGBA"))
    return out.convert("RGB")


@dataclass
class PasteBack:
    """How the pipeline's outputs go back into the input pictures at their own resolution: the generated
    picture is resized into `box` (the whole image without a crop) and the original laid over it with opacity
    `keeps` — the inverted mask (diffusers' overlay: the original wherever the mask is 0) or a feather of it."""

    originals: list[Image.Image]  # RGB, input resolution
    keeps: list[Image.Image]  # L, 255 = the original pixel, 0 = the generated one; one per mask
    reach: float = 0.0  # how far outside the mask the weights reach (the feather), px
    box: tuple[int, int, int, int] | None = None

    @classmethod
    def build(cls, image: ImageInput, mask: ImageInput, preserve: bool, mask_blur: float) -> PasteBack:
        """`mask` as edited but not yet blurred: preserve feathers it by 4·mask_blur + 2 px; otherwise the
        blurred mask is the alpha, as the overlay of diffusers' padding_mask_crop uses the mask it was given."""
        originals, masks = to_pil_list(image, "RGB", "image"), to_pil_list(mask, "L", "mask_image")
        for m in masks:
            check_blur(mask_blur, m)
        if preserve:
            width = feather_width(mask_blur)
            keeps = [np.rint(255 * (1 - feather(m, width))).astype(np.uint8) for m in masks]
            return cls(originals, [Image.fromarray(k) for k in keeps], width)
        return cls(originals, [ImageOps.invert(blur_mask(m, mask_blur).convert("L")) for m in masks])

    def crop(self, image: ImageInput, mask: ImageInput, width: int, height: int, pad: int):
        """padding_mask_crop: cut the box around `mask` (+ `pad` px, at least the feather's reach, so the blend
        fits inside), remember it, and return the image and mask of the box resized to width × height."""
        pad = number(pad, "padding_mask_crop", integer=True, low=0)  # a pad past the image is the whole image
        images, masks = to_pil_list(image, "RGB", "image"), to_pil_list(mask, "L", "mask_image")
        if len(images) != 1 or len(masks) != 1:
            raise InputError("padding_mask_crop works on one image and one mask; call once per image")
        # PIL inputs keep their mode through the resize, as in diffusers (an RGBA image resizes premultiplied)
        image, mask = (x[0] if isinstance(x, (list, tuple)) else x for x in (image, mask))
        image = normalize_pil(image, "RGB", "image") if isinstance(image, Image.Image) else images[0]
        mask = normalize_pil(mask, "L", "mask_image") if isinstance(mask, Image.Image) else masks[0]
        self.box = crop_region(mask, width, height, max(pad, math.ceil(self.reach)))
        return crop_and_fill(image, self.box, width, height), crop_and_fill(mask, self.box, width, height)

    def __call__(self, images: list[Image.Image]) -> list[Image.Image]:
        out = []
        for i, generated in enumerate(images):  # output i was made from input i mod n (see pipeline._expand)
            original, keep = self.originals[i % len(self.originals)], self.keeps[i % len(self.keeps)]
            if self.box is None:
                if generated.size != original.size:
                    generated = generated.resize(original.size, resample=Image.LANCZOS)
                out.append(composite(original, generated, keep))
                continue
            x1, y1, x2, y2 = self.box  # outside the box the mask is 0 (the box holds all of it and the feather)
            pasted = original.copy()
            generated = resize_cover(generated, x2 - x1, y2 - y1)
            pasted.paste(composite(original.crop(self.box), generated, keep.crop(self.box)), (x1, y1))
            out.append(pasted)
        return out


# -- outpainting -------------------------------------------------------------------------------------------------
def extend_canvas(image: Image.Image, left: int, top: int, right: int, bottom: int,
                  overlap: int = OUTPAINT_OVERLAP) -> tuple[Image.Image, Image.Image]:
    """The image on a canvas `left`…`bottom` px larger, the new border filled by repeating the edge pixels, and
    the mask of what to paint: the border plus `overlap` px into the image along each extended side. Width and
    height are rounded up to a multiple of 8, the extra pixels going to the right (bottom) border, or to the left
    (top) one when only that side is extended. A canvas side over MAX_CANVAS_SIDE is refused before anything
    is allocated."""
    left, top, right, bottom = (number(v, f"outpaint {name}", integer=True, low=0)
                                for name, v in dict(left=left, top=top, right=right, bottom=bottom).items())
    if not (left or top or right or bottom):
        raise InputError("outpaint needs at least one of left, top, right, bottom > 0")
    overlap = number(overlap, "outpaint overlap", integer=True, low=0)
    w, h = image.width + left + right, image.height + top + bottom
    if max(w, h) > MAX_CANVAS_SIDE:
        raise InputError(f"outpainting {image.width}x{image.height} by left {left}, top {top}, right {right}, "
                         f"bottom {bottom} makes a {w}x{h} canvas; extend by less: at most {MAX_CANVAS_SIDE} px "
                         "a side")
    extra_w, extra_h = -w % VAE_SCALE, -h % VAE_SCALE
    if left and not right:
        left += extra_w
    else:
        right += extra_w
    if top and not bottom:
        top += extra_h
    else:
        bottom += extra_h
    pixels = np.pad(np.asarray(image.convert("RGB")), ((top, bottom), (left, right), (0, 0)), mode="edge")
    keep = [left + (overlap if left else 0), top + (overlap if top else 0),
            left + image.width - (overlap if right else 0), top + image.height - (overlap if bottom else 0)]
    if keep[0] >= keep[2] or keep[1] >= keep[3]:
        raise InputError(f"the image ({image.width}x{image.height}) is too small for an outpaint overlap of "
                         f"{overlap} px on both sides")
    mask = np.full(pixels.shape[:2], 255, dtype=np.uint8)
    mask[keep[1]:keep[3], keep[0]:keep[2]] = 0
    return Image.fromarray(pixels), Image.fromarray(mask)


def outpaint(pipe, prompt, image: ImageInput, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0,
             overlap: int = OUTPAINT_OVERLAP, **call_kwargs):
    """Extend `image` by the given pixels on each side and paint the new border (see `extend_canvas`).

    Args:
        pipe: a loaded `Pipeline` (an inpainting model, or a plain one that inpaints by latent blending).
        prompt: what the whole, larger picture shows.
        image: the picture to extend (one image).
        left, top, right, bottom: pixels to add on each side, ≥ 0; the canvas is rounded up to a multiple of 8.
        overlap: pixels of the original repainted along each extended side, for a seamless join.
        **call_kwargs: anything `Pipeline.__call__` takes (generator, num_inference_steps, preserve_unmasked …);
            height and width default to the canvas size.
    Returns the pipeline's output; its images have the canvas size.
    """
    images = to_pil_list(image, "RGB", "image")
    if len(images) != 1:
        raise InputError(f"outpaint extends one image, got {len(images)}; call it once per image")
    canvas, mask = extend_canvas(images[0], left, top, right, bottom, overlap)
    call_kwargs.setdefault("height", canvas.height)
    call_kwargs.setdefault("width", canvas.width)
    return pipe(prompt, image=canvas, mask_image=mask, **call_kwargs)
