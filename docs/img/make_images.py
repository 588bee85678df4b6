"""Regenerate the pictures of docs/inpainting.md and docs/research.md with the tiny random test model (they show
the mechanics of each option, not model quality): .venv/bin/python docs/img/make_images.py  (about a minute on a
CPU); `... make_images.py attention_maps.png` makes only that one."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))
from conftest import build_folder, make_image, make_mask  # noqa: E402

import ldm_inpaint  # noqa: E402
from ldm_inpaint.attention_maps import heat_colors, save_token_maps, token_labels  # noqa: E402
from ldm_inpaint.inpaint import (blur_mask, crop_region, edit_mask, extend_canvas, feather,  # noqa: E402
                                 feather_width, resize_fill)

W, H = 96, 64
BOX = (40, 20, 64, 40)
STEPS = 4


def sheet(name: str, panels: list[tuple[str, Image.Image]], scale: int = 2, colours: int = 128) -> None:
    """Panels side by side on grey, each under its caption, enlarged `scale`× (nearest), saved with a
    palette of `colours` to stay a few KB."""
    label, gap = 12, 4
    h = max(p.height for _, p in panels) * scale
    out = Image.new("RGB", (sum(p.width * scale + gap for _, p in panels) + gap, h + label + gap), (150, 150, 150))
    draw, x = ImageDraw.Draw(out), gap
    for caption, p in panels:
        out.paste(p.convert("RGB").resize((p.width * scale, p.height * scale), Image.NEAREST), (x, label))
        draw.text((x + 1, 0), caption, fill="black")
        x += p.width * scale + gap
    out.quantize(colours, dither=Image.Dither.NONE).save(HERE / name, optimize=True)
    print(name, (HERE / name).stat().st_size, "bytes")


def changed(a: Image.Image, b: Image.Image) -> Image.Image:
    """White where two pictures differ at all (as 8-bit values)."""
    d = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max(axis=-1)
    return Image.fromarray(np.where(d > 0, 255, 0).astype(np.uint8))


def tiny_pipeline() -> ldm_inpaint.Pipeline:
    torch.manual_seed(0)
    folder = build_folder(Path(tempfile.mkdtemp()) / "tiny-sd15-inpainting", 9, "sd15-inpainting")
    return ldm_inpaint.load_pipeline(folder)


def main() -> None:
    pipe = tiny_pipeline()

    def run(image, mask, **kw):
        kw.setdefault("num_inference_steps", STEPS)
        return pipe("a cat", image=image, mask_image=mask, generator=torch.Generator().manual_seed(0),
                    progress=False, **kw).images[0]

    image, mask = make_image(W, H), make_mask(W, H, BOX)

    default, kept = run(image, mask), run(image, mask, preserve_unmasked=True)
    sheet("preserve.png", [("input", image), ("mask", mask), ("default", default), ("preserve", kept),
                           ("changed: default", changed(default, image)), ("changed: preserve", changed(kept, image))])

    soft = run(image, mask, preserve_unmasked=True, mask_blur=3)
    weight = Image.fromarray((255 * feather(mask, feather_width(3))).round().astype(np.uint8))
    sheet("mask_edits.png", [("mask", mask), ("grow 6", edit_mask(mask, grow=6)), ("grow -6", edit_mask(mask, grow=-6)),
                             ("invert", edit_mask(mask, invert=True)), ("blur 3", blur_mask(mask, 3)),
                             ("paste weight", weight), ("blur 3+preserve", soft)])

    big, small_mask = make_image(192, 128, seed=1), make_mask(192, 128, (130, 30, 150, 50))
    box = crop_region(small_mask, 64, 64, 8)
    framed = big.copy()
    ImageDraw.Draw(framed).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline="red")
    sheet("crop.png", [("input + crop box", framed), ("model sees", resize_fill(big.crop(box), 64, 64)),
                       ("crop-to-mask 8", run(big, small_mask, padding_mask_crop=8))], scale=1)

    canvas, border = extend_canvas(image, 24, 0, 8, 8)
    out = ldm_inpaint.outpaint(pipe, "a cat", image, left=24, right=8, bottom=8, num_inference_steps=STEPS,
                               generator=torch.Generator().manual_seed(0), preserve_unmasked=True, progress=False)
    sheet("outpaint.png", [("input", image), ("edge-extended", canvas), ("mask", border),
                           ("outpaint+preserve", out.images[0])])

    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(255 - np.asarray(mask)))
    checker = Image.fromarray(((np.indices((H, W)) // 4).sum(0) % 2 * 60 + 160).astype(np.uint8)).convert("RGBA")
    shown = Image.alpha_composite(checker, rgba)
    alpha_mask = ldm_inpaint.mask_from_alpha(rgba)
    sheet("alpha.png", [("RGBA input", shown), ("mask from alpha", alpha_mask),
                        ("output", run(rgba.convert("RGB"), alpha_mask, preserve_unmasked=True))])

    no, yes = run(image, mask, output_type="np"), run(image, mask, output_type="np", masked_latents_blend=True)
    x = ldm_inpaint.image.preprocess_image(image, H, W)
    round_trip = (pipe.decode(pipe.encode_image(x, None, sample=False))[0].permute(1, 2, 0).numpy() + 1) / 2
    src = np.asarray(image, dtype=np.float32) / 255
    keep = (np.asarray(mask) == 0)[..., None]
    amplified = [Image.fromarray((np.clip(np.abs(o - src) * keep * 2, 0, 1) * 255).round().astype(np.uint8))
                 for o in (round_trip, no, yes)]
    sheet("drift.png", [("|change| x2: VAE only", amplified[0]), ("blend off", amplified[1]),
                        ("blend on", amplified[2])], colours=24)
    attention_sheet(pipe)


def attention_sheet(pipe: ldm_inpaint.Pipeline, prompt: str = "a red brick wall") -> None:
    """The output of an inpainting run, then per prompt token its cross-attention map as the CLI's
    --attention-maps writes it (save_token_maps: scaled by its own maximum, over the output) and, below, the
    same heat alone, which the noisy output of a random model would otherwise hide."""
    image, mask = make_image(W, H), make_mask(W, H, BOX)
    out = pipe(prompt, image=image, mask_image=mask, num_inference_steps=STEPS, return_attention_maps=True,
               generator=torch.Generator().manual_seed(0), progress=False)
    labels = token_labels(pipe.tokenizer, prompt)
    with tempfile.TemporaryDirectory() as folder:
        paths = save_token_maps(out.attention_maps[0], out.images[0], labels, folder)
        overlays = [Image.open(p).copy() for p in paths]
    maps = out.attention_maps[0, 1:len(labels) + 1, None]  # (tokens, 1, h, w): position 0 is BOS
    heat = torch.nn.functional.interpolate(maps, size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    heat = heat_colors((heat / heat.amax(dim=(1, 2), keepdim=True)).numpy())  # (tokens, H, W, 3)
    panels = [("output", out.images[0])]
    for label, overlay, colours in zip(labels, overlays, heat):
        column = Image.new("RGB", (W, 2 * H + 2), (150, 150, 150))
        column.paste(overlay, (0, 0))
        column.paste(Image.fromarray((255 * colours).round().astype(np.uint8)), (0, H + 2))
        panels.append((f'"{label}"', column))
    sheet("attention_maps.png", panels)


if __name__ == "__main__":
    if sys.argv[1:] == ["attention_maps.png"]:
        attention_sheet(tiny_pipeline())
    else:
        main()
