"""The procedural data set the embedded demo model learns: 1–2 flat shapes (circle, square, triangle) in six
clear colours on a plain or two-tone background, captioned "a red circle and a blue square on a yellow
background". Small enough to learn in minutes, and checkable: a test can read a shape's colour off its pixels.

Geometry is in fractions of the picture side, so a scene renders at any size. Shapes are listed (and captioned)
left to right; a two-tone background's colours top (left) first. A shape never takes a background colour, the
two shapes never repeat a (kind, colour) pair and keep SHAPE_GAP apart, so every caption word is visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..checks import InputError, number
from .data import item_generator, to_pixels
from .masks import random_mask

COLOURS = {  # saturated, far apart in RGB, so a colour is read off a pixel without doubt
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
KINDS = ("circle", "square", "triangle")
SHAPE_SIZE = (24 / 128, 64 / 128)  # side of a shape's (square) box, × the picture side: 24–64 px at 128
SHAPE_GAP = 4 / 128  # the least space between two shapes' boxes, so one's mask (below) leaves the other whole
PLACEMENT_TRIES = 20  # tries to place a second shape clear of the first; after that the scene keeps one
SHARE_TWO_SHAPES = 0.4
SHARE_TWO_TONE = 0.3  # two-tone backgrounds, split at the middle, horizontally or vertically (half each)
SHARE_SHAPE_MASK = 0.5  # masks over one shape's box (what the demo asks for); the others are masks.random_mask
MASK_MARGIN = 4 / 128  # a shape mask reaches this far past the shape's box, × the picture side
DEMO_MASK = 48 / 128  # the side of demo_inputs' centred square mask, × the picture side
SUPERSAMPLE = 4  # render at 4× and box-filter down: antialiased edges without Lanczos ringing off-colour


@dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    colour: str  # a COLOURS name
    box: tuple[float, float, float, float]  # (left, top, right, bottom), fractions of the picture side; square


@dataclass(frozen=True)
class Scene:
    background: tuple[str, ...]  # one colour name, or two: top (left) first
    split: str | None  # "horizontal" (top | bottom), "vertical" (left | right) or None (one colour)
    shapes: tuple[Shape, ...]  # left to right


def random_scene(rng: torch.Generator | np.random.Generator) -> Scene:
    """A scene drawn from a torch or numpy generator: the same generator state gives the same scene."""
    u = _uniform_source(rng)

    def pick(options):
        return options[min(int(u() * len(options)), len(options) - 1)]

    background = (pick(list(COLOURS)),)
    split = None
    if u() < SHARE_TWO_TONE:
        background += (pick([c for c in COLOURS if c != background[0]]),)
        split = pick(("horizontal", "vertical"))
    shapes: list[Shape] = []
    for _ in range(2 if u() < SHARE_TWO_SHAPES else 1):
        for _ in range(PLACEMENT_TRIES):
            side = SHAPE_SIZE[0] + u() * (SHAPE_SIZE[1] - SHAPE_SIZE[0])
            left, top = u() * (1 - side), u() * (1 - side)
            box = (left, top, left + side, top + side)
            if not any(_near(box, s.box) for s in shapes):
                break
        else:
            break
        taken = {(s.kind, s.colour) for s in shapes}
        kind, colour = pick([(k, c) for k in KINDS for c in COLOURS
                             if c not in background and (k, c) not in taken])
        shapes.append(Shape(kind, colour, box))
    return Scene(background, split, tuple(sorted(shapes, key=lambda s: s.box[0])))


def render(scene: Scene, size: int = 128) -> Image.Image:
    """The scene as a size × size RGB picture."""
    big = size * SUPERSAMPLE
    im = Image.new("RGB", (big, big), COLOURS[scene.background[0]])
    draw = ImageDraw.Draw(im)
    if scene.split == "horizontal":
        draw.rectangle((0, big // 2, big, big), fill=COLOURS[scene.background[1]])
    elif scene.split == "vertical":
        draw.rectangle((big // 2, 0, big, big), fill=COLOURS[scene.background[1]])
    for s in scene.shapes:
        left, top, right, bottom = (v * big for v in s.box)
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif s.kind == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:  # triangle, pointing up
            draw.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=fill)
    return im.reduce(SUPERSAMPLE)


def caption(scene: Scene) -> str:
    """"a red circle and a blue square on a green and white background"."""
    things = " and ".join(f"a {s.colour} {s.kind}" for s in scene.shapes)
    return f"{things} on a {' and '.join(scene.background)} background"


def shape_mask(shape: Shape, size: int) -> torch.Tensor:
    """A (1, size, size) float32 mask of 1 over the shape's box and MASK_MARGIN around it."""
    left, top, right, bottom = (round(min(max(v + d, 0), 1) * size) for v, d in
                                zip(shape.box, (-MASK_MARGIN, -MASK_MARGIN, MASK_MARGIN, MASK_MARGIN)))
    mask = torch.zeros(1, size, size)
    mask[:, top:bottom, left:right] = 1
    return mask


class ShapesDataset(torch.utils.data.Dataset):
    """`length` random scenes per epoch, items as ImageFolder's: pixels (3, size, size) float32 in [-1, 1],
    caption, mask (1, size, size) of 0/1 (absent with masks=None) and index. Each (seed, epoch, index) draws
    its own scene, so every epoch is fresh data, and the same triple always gives the same item. Masks:
    SHARE_SHAPE_MASK of them cover one shape (shape_mask), the rest are masks.random_mask."""

    def __init__(self, length: int, size: int = 128, seed: int = 0, masks: str | None = "random",
                 caption_dropout: float = 0.0):
        self.length = number(length, "length", integer=True, low=1)
        self.size = number(size, "size", integer=True, low=8)
        if self.size % 8:
            raise InputError(f"size must be a multiple of 8 (the VAE's scale), got {self.size}")
        if masks not in (None, "random"):
            raise InputError(f"masks must be None or 'random' for the shapes data set, got {masks!r}")
        self.masks = masks
        self.seed = number(seed, "seed", integer=True)
        self.caption_dropout = number(caption_dropout, "caption_dropout", low=0, high=1)
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = number(epoch, "epoch", integer=True, low=0)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"item {index} of {self.length}")
        image, text, mask = self.draw(index)
        item = dict(pixels=to_pixels(image), caption=text, index=index)
        if mask is not None:
            item["mask"] = mask
        return item

    def draw(self, index: int) -> tuple[Image.Image, str, torch.Tensor | None]:
        """Item `index`'s picture, caption (after dropout) and mask (None with masks=None)."""
        g = item_generator(self.seed, self.epoch, index)
        scene = random_scene(g)
        drop, kind, which = torch.rand(3, generator=g).tolist()
        text = "" if drop < self.caption_dropout else caption(scene)
        mask = None
        if self.masks == "random":
            if kind < SHARE_SHAPE_MASK:
                mask = shape_mask(scene.shapes[int(which * len(scene.shapes))], self.size)
            else:
                mask = random_mask(self.size, self.size, g)
        return render(scene, self.size), text, mask


def write_folder(path, n: int, seed: int = 0, size: int = 128) -> Path:
    """Epoch 0 of ShapesDataset(n, size, seed) as an image folder: 00000.png, 00000.txt (caption) and
    masks/00000.png (white = repaint), readable by ImageFolder(path, resolution=size, masks="data") and
    `python -m ldm_inpaint.train --data path`. Returns the folder."""
    folder = Path(path)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(n, size, seed)
    for i in range(data.length):
        image, text, mask = data.draw(i)
        image.save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(text + "\n", encoding="utf-8")
        Image.fromarray((mask[0].numpy() * 255).astype(np.uint8)).save(folder / "masks" / f"{i:05d}.png")
    return folder


def demo_inputs(colour_background: str, size: int = 128) -> tuple[Image.Image, Image.Image]:
    """What the demo and the quality tests inpaint into: a plain picture of that colour and a centred square
    mask (mode "L", white = repaint) DEMO_MASK of its side."""
    if colour_background not in COLOURS:
        raise InputError(f"colour {colour_background!r} is not one of the shapes' colours: {', '.join(COLOURS)}")
    size = number(size, "size", integer=True, low=8)
    image = Image.new("RGB", (size, size), COLOURS[colour_background])
    mask = Image.new("L", (size, size), 0)
    side = round(DEMO_MASK * size)
    start = (size - side) // 2
    mask.paste(255, (start, start, start + side, start + side))
    return image, mask


def _near(a: tuple, b: tuple) -> bool:
    """Whether two boxes come closer than SHAPE_GAP."""
    return (a[0] < b[2] + SHAPE_GAP and b[0] < a[2] + SHAPE_GAP and
            a[1] < b[3] + SHAPE_GAP and b[1] < a[3] + SHAPE_GAP)


def _uniform_source(rng) -> Callable[[], float]:
    """A function drawing uniform floats in [0, 1) from a torch or numpy generator."""
    if isinstance(rng, torch.Generator):
        return lambda: torch.rand((), generator=rng).item()
    if isinstance(rng, np.random.Generator):
        return rng.random
    raise InputError(f"rng must be a torch.Generator or numpy.random.Generator, got {type(rng).__name__}")
