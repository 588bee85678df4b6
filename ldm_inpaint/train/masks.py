"""Random inpainting masks for training, after the SD inpainting recipe (Rombach et al. 2022, and the
stable-diffusion-inpainting model cards): LaMa-style synthetic masks (Suvorov et al. 2022) — thick random brush
strokes and boxes — and, for a quarter of the images, everything masked, so the model also learns to draw a
whole picture from the caption alone.

Sizes are fractions of the picture's shorter side (boxes: of each side), so a mask looks the same at any
resolution. Every draw comes from the caller's torch.Generator: the same generator state gives the same mask.
A mask is never empty: one with fewer than MIN_COVERAGE of its pixels set gets another box, because an empty
mask teaches nothing about inpainting and would make the masked-image input a plain copy of the target.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

FULL_SHARE = 0.25  # masks that cover everything: "in 25% mask everything" (SD 1.5 / 2 inpainting model cards)
STROKES_PROB = 0.7  # of the other masks, those with brush strokes …
BOXES_PROB = 0.5  # … and those with boxes; both may be drawn (OR-ed), and a mask with neither gets strokes
STROKES = (1, 4)  # polylines per mask, inclusive
STROKE_VERTICES = (2, 8)  # points per polyline, inclusive
STROKE_STEP = (0.15, 0.45)  # length of one segment, × the shorter side
STROKE_WIDTH = (0.05, 0.25)  # brush width, × the shorter side: LaMa's "thick" strokes
BOXES = (1, 3)  # boxes per mask, inclusive
BOX_SIDE = (0.1, 0.5)  # box height (width), × the picture's height (width)
MIN_COVERAGE = 0.02  # the least share of pixels a mask covers


def random_mask(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A (1, height, width) float32 mask of 0/1, 1 = repaint: everything (FULL_SHARE of the time), else brush
    strokes and/or boxes covering at least MIN_COVERAGE of the pixels."""
    if _uniform(generator) < FULL_SHARE:
        return torch.ones(1, height, width)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    strokes, boxes = _uniform(generator) < STROKES_PROB, _uniform(generator) < BOXES_PROB
    if strokes or not boxes:
        for _ in range(_integer(generator, *STROKES)):
            _stroke(draw, height, width, generator)
    if boxes:
        for _ in range(_integer(generator, *BOXES)):
            _box(draw, height, width, generator)
    while (np.asarray(canvas) >= 128).mean() < MIN_COVERAGE:
        _box(draw, height, width, generator)
    return torch.from_numpy(np.asarray(canvas) >= 128).float()[None]  # (1, H, W)


def _stroke(draw: ImageDraw.ImageDraw, height: int, width: int, g: torch.Generator) -> None:
    """A polyline from a random start, each segment in a random direction, kept inside the picture; round
    joints and ends (a disc at each vertex), as a brush would leave."""
    side = min(height, width)
    brush = max(1, round(_uniform(g, *STROKE_WIDTH) * side))
    x, y = _uniform(g) * width, _uniform(g) * height
    points = [(x, y)]
    for _ in range(_integer(g, *STROKE_VERTICES) - 1):
        angle, step = _uniform(g, 0, 2 * math.pi), _uniform(g, *STROKE_STEP) * side
        x = min(max(x + step * math.cos(angle), 0), width - 1)
        y = min(max(y + step * math.sin(angle), 0), height - 1)
        points.append((x, y))
    draw.line(points, fill=255, width=brush, joint="curve")
    r = brush / 2
    for px, py in points:
        draw.ellipse((px - r, py - r, px + r, py + r), fill=255)


def _box(draw: ImageDraw.ImageDraw, height: int, width: int, g: torch.Generator) -> None:
    h, w = max(1, round(_uniform(g, *BOX_SIDE) * height)), max(1, round(_uniform(g, *BOX_SIDE) * width))
    top, left = int(_uniform(g) * (height - h + 1)), int(_uniform(g) * (width - w + 1))
    draw.rectangle((left, top, left + w - 1, top + h - 1), fill=255)  # PIL's corners are both inside


def _uniform(g: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * torch.rand((), generator=g).item()


def _integer(g: torch.Generator, low: int, high: int) -> int:
    """A whole number in [low, high], both included."""
    return int(torch.randint(low, high + 1, (), generator=g))
