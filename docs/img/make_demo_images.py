"""The pictures of the demo model in docs/training.md: .venv/bin/python docs/img/make_demo_images.py (seconds).

demo_samples.png: per prompt, the input with its mask (red outline) and the demo model's result for four seeds;
the last rows are fully masked (made from the text alone)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

import ldm_inpaint
from ldm_inpaint.train.shapes import demo_inputs

HERE = Path(__file__).resolve().parent
SEEDS = (0, 1, 2, 3)
ROWS = [("a red circle on a white background", "white", False),
        ("a blue square on a white background", "white", False),
        ("a yellow triangle on a black background", "black", False),
        ("a green circle on a yellow background", "yellow", False),
        ("a red square on a blue background", "white", True),
        ("a white circle and a green triangle on a black background", "white", True)]


def main() -> None:
    pipe = ldm_inpaint.load_pipeline("demo")
    size, label, gap, scale = 128, 14, 4, 1
    width = (1 + len(SEEDS)) * (size + gap) + gap
    out = Image.new("RGB", (width, len(ROWS) * (size + label + gap) + gap), (150, 150, 150))
    draw = ImageDraw.Draw(out)
    for r, (prompt, background, full) in enumerate(ROWS):
        image, mask = demo_inputs(background, size)
        if full:
            mask = mask.point(lambda _: 255)
        top = gap + r * (size + label + gap)
        draw.text((gap, top), prompt + ("  (everything masked)" if full else ""), fill="black")
        shown = image.copy()
        ImageDraw.Draw(shown).rectangle(mask.getbbox(), outline=(255, 0, 0))
        out.paste(shown, (gap, top + label))
        images = pipe(prompt, image=image, mask_image=mask, num_inference_steps=30, num_images_per_prompt=len(SEEDS),
                      generator=[torch.Generator().manual_seed(s) for s in SEEDS], progress=False).images
        for c, picture in enumerate(images):
            out.paste(picture, (gap + (c + 1) * (size + gap), top + label))
    out.save(HERE / "demo_samples.png", optimize=True)


if __name__ == "__main__":
    main()
