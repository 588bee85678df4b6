"""Command line: python -m ldm_inpaint.sample --image photo.png --mask mask.png --prompt "a red brick wall"

Only file I/O lives here; the flags mirror the arguments of `Pipeline.__call__`, so a seed gives the same image
as the Python API called with `generator=torch.Generator().manual_seed(seed)`. Each PNG carries the generation
parameters in its text chunks. Bad input exits with status 2 and a one-line error; an image is written to a
temporary file and renamed into place, so no partial output is ever left behind.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
LARGE_INPUT = 2_000_000  # pixels; above this, and with no size or crop given, the cost is said up front


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error: …` line (exit 2) like every other bad input, not usage + error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: …)" only where the help text does not already say what the default is."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="python -m ldm_inpaint.sample", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--model", default="demo", help="diffusers-layout folder, hub repo id (owner/name[@rev]) or "
                   "single checkpoint file; default: the small demo model that ships with the package")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--prompt-2", default=None, help="SDXL: the second text encoder's prompt (default: --prompt)")
    p.add_argument("--negative-prompt-2", default=None, help="SDXL: default --negative-prompt")
    p.add_argument("--image", default=None, help="input image; without it: text-to-image")
    p.add_argument("--mask", default=None, help="white = repaint, black = keep; without it: the image's transparent "
                   "pixels if it has an alpha channel, else img2img")
    p.add_argument("--out", default="out.png", help="output PNG; several images become out_0.png, out_1.png, …")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (atomically)")
    p.add_argument("--steps", type=int, default=50, help="num_inference_steps")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="default 7.5 (SDXL text-to-image and img2img: 5.0)")
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--strength", type=float, default=None,
                   help="default 1.0 for inpainting (SDXL 0.9999), 0.8 for img2img (SDXL 0.3)")
    p.add_argument("--seed", type=int, default=None, help="default (or -1): a random seed, stored in the PNG")
    p.add_argument("--scheduler", default=None, help="a name from ldm_inpaint.schedulers.available(); "
                                                      "default: the checkpoint's own")
    p.add_argument("--num-images", type=int, default=1, help="num_images_per_prompt")
    p.add_argument("--height", type=int, default=None, help="default: the input image's height")
    p.add_argument("--width", type=int, default=None, help="default: the input image's width")
    p.add_argument("--clip-skip", type=int, default=None)
    g = p.add_argument_group("keeping the picture (see docs/inpainting.md)")
    g.add_argument("--preserve-unmasked", action="store_true",
                   help="return the input's own pixels away from the mask (recommended for photos)")
    g.add_argument("--mask-blur", type=float, default=0, help="Gaussian blur of the mask, px")
    g.add_argument("--mask-grow", type=int, default=0, help="grow the mask by N px; negative shrinks it")
    g.add_argument("--invert-mask", action="store_true", help="repaint the black part instead of the white")
    g.add_argument("--crop-to-mask", type=int, default=None, metavar="N",
                   help="inpaint only a box around the mask plus N px, at the model's size, and paste it back")
    g.add_argument("--masked-latents-blend", action="store_true",
                   help="9-channel models: re-impose the known region's latents each step")
    g.add_argument("--outpaint", default=None, metavar="LEFT,TOP,RIGHT,BOTTOM",
                   help="extend the image by these many px on each side and paint the border (no --mask)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA file (kohya / A1111 / ComfyUI or diffusers layout) at SCALE (default 1); "
                        "repeat to stack several")
    p.add_argument("--attention-maps", default=None, metavar="DIR",
                   help="write each prompt token's cross-attention map as a heat overlay on the output, "
                        "DIR/NN_token.png (DIR/<image index>/… for several images)")
    p.add_argument("--conventions", choices=("diffusers", "original"), default="diffusers",
                   help="'original': the release code's (ldm / sgm) numerics where diffusers differs (docs/parity.md)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def parse_sides(text: str) -> dict[str, int]:
    """"LEFT,TOP,RIGHT,BOTTOM" → outpaint()'s keyword arguments."""
    from .checks import InputError

    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise InputError(f"--outpaint {text!r}: give four whole numbers of pixels, LEFT,TOP,RIGHT,BOTTOM")
    return dict(zip(("left", "top", "right", "bottom"), (int(p) for p in parts)))


def parse_lora(spec: str) -> tuple[str, float]:
    """"FILE[:SCALE]" → (file, scale), the file checked to exist. A colon followed by no number belongs to the
    file name (C:\\loras\\x.safetensors)."""
    from .checks import InputError, number

    file, _, scale = spec.rpartition(":")
    try:
        value = float(scale)
    except ValueError:
        file, value = spec, 1.0
    if not file or not os.path.isfile(file):
        raise InputError(f"--lora {spec!r}: no such file (give FILE or FILE:SCALE)")
    return file, number(value, "--lora scale")


def output_paths(out: str, n: int, overwrite: bool) -> list[str]:
    """The PNG files a run will write, checked before anything is loaded (outputs.check_writable)."""
    from .checks import InputError
    from .outputs import check_writable

    stem, ext = os.path.splitext(out)
    if ext.lower() != ".png":
        raise InputError(f"--out {out!r}: the output must be a .png file")
    paths = [out] if n == 1 else [f"{stem}_{i}{ext}" for i in range(n)]
    check_writable(paths, overwrite)
    return paths


def _weights_bytes(model: str) -> int:
    """The largest weight file of a local model (the pipeline holds one stage's weights at a time); 0 for a hub
    id, whose files are not known before it is resolved."""
    if os.path.isfile(model):
        return os.path.getsize(model)
    sizes = [os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(model) for f in files
             if f.endswith((".safetensors", ".bin"))] if os.path.isdir(model) else []
    return max(sizes, default=0)


def _check_size(args, image, dtype) -> None:
    """Refuse a run that cannot fit in memory, and say what a large photo will cost, before loading."""
    from .checks import check_memory, memory_needed

    if image is None or args.crop_to_mask is not None:
        # the size is the model's, known once it is loaded (the pipeline checks it then); 8 px is a lower bound
        # that already refuses an absurd --num-images before a billion file names are made
        height, width = args.height or 8, args.width or 8
    else:
        height, width = args.height or image.height, args.width or image.width
    if args.height is None and args.width is None and args.crop_to_mask is None and height * width > LARGE_INPUT:
        need = memory_needed(height, width, args.num_images, dtype) / 2**30
        print(f"note: the model works at the input's size, {width}x{height} ({height * width / 1e6:.1f} MP): "
              f"about {need:.1f} GiB for decoding and {height * width / 512**2:.0f}x the time of 512x512; "
              "--crop-to-mask 32 inpaints only around the mask, --height/--width set a smaller size",
              file=sys.stderr)
    check_memory(height, width, args.num_images, dtype, _weights_bytes(args.model))


def run(args: argparse.Namespace) -> list[str]:
    import torch

    from . import checks, load_pipeline, outpaint
    from .checks import InputError
    from .image import load_image
    from .inpaint import extend_canvas, has_alpha, mask_from_alpha
    from .outputs import check_writable, save_png

    # everything that can be checked is checked before minutes of loading, not after
    device = checks.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    checks.number(args.num_images, "--num-images", integer=True, low=1)
    image = load_image(args.image) if args.image else None
    mask = load_image(args.mask, "mask") if args.mask else None
    sides = parse_sides(args.outpaint) if args.outpaint else None
    loras = [parse_lora(spec) for spec in args.lora]
    if sides is not None:
        if image is None or mask is not None:
            raise InputError("--outpaint needs --image and makes its own mask: leave out --mask")
        canvas, _ = extend_canvas(image, **sides)  # checks the sides
    elif mask is None and image is not None and has_alpha(image):
        mask = mask_from_alpha(image)  # transparent = repaint; an image with no transparent pixel is an error
        image = image.convert("RGB")  # its colours are what is kept; a transparent pixel resized would darken
    _check_size(args, canvas if sides is not None else image, dtype)
    paths = output_paths(args.out, args.num_images, args.overwrite)
    if args.attention_maps is not None:  # the folder is made if missing: the nearest one that exists must be writable
        folder = os.path.abspath(args.attention_maps)
        while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)
        check_writable([os.path.join(folder, "map.png")], overwrite=True, flag="--attention-maps")
    random_seed = args.seed is None or args.seed == -1
    seed = secrets.randbelow(2**31) if random_seed else checks.number(args.seed, "--seed", integer=True, low=0,
                                                                      high=2**64 - 1)
    if args.model == "demo":
        print("note: no --model given: using the small demo model that ships with ldm_inpaint (shapes in 6 colours "
              "at 128x128, docs/training.md); give --model for Stable Diffusion", file=sys.stderr)
    pipe = load_pipeline(args.model, dtype=dtype, device=device)
    for file, lora_scale in loras:
        pipe.load_lora(file, lora_scale)
    scheduler = args.scheduler or pipe.scheduler_config.get("_class_name", "")  # for the PNG: what ran
    kwargs = dict(negative_prompt=args.negative_prompt, prompt_2=args.prompt_2,
                  negative_prompt_2=args.negative_prompt_2, num_inference_steps=args.steps,
                  guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale, strength=args.strength,
                  generator=torch.Generator().manual_seed(seed), num_images_per_prompt=args.num_images,
                  height=args.height, width=args.width, scheduler=args.scheduler, clip_skip=args.clip_skip,
                  conventions=args.conventions, return_attention_maps=args.attention_maps is not None,
                  progress=not args.no_progress)
    picture = dict(preserve_unmasked=args.preserve_unmasked, mask_blur=args.mask_blur, mask_grow=args.mask_grow,
                   invert_mask=args.invert_mask, padding_mask_crop=args.crop_to_mask,
                   masked_latents_blend=args.masked_latents_blend)
    picture = {k: v for k, v in picture.items() if v not in (None, False, 0)}  # only what was asked for
    if sides is not None:
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k not in ("height", "width")}
        out = outpaint(pipe, args.prompt, image, **sides, **kwargs, **picture)
    else:
        out = pipe(args.prompt, image=image, mask_image=mask, **kwargs, **picture)
    parameters = dict(prompt=args.prompt, negative_prompt=args.negative_prompt or "", seed=seed, steps=args.steps,
                      scheduler=scheduler, guidance_scale=args.guidance_scale or "default",
                      strength=args.strength or "default", model=args.model, dtype=args.dtype, **picture)
    if sides is not None:
        parameters["outpaint"] = args.outpaint
    if loras:
        parameters["lora"] = [f"{file}:{lora_scale:g}" for file, lora_scale in loras]
    if pipe.family.text_encoders == 2:
        parameters.update(prompt_2=args.prompt_2 or args.prompt, negative_prompt_2=args.negative_prompt_2 or "")
    if args.conventions != "diffusers":
        parameters["conventions"] = args.conventions
    for i, (img, path) in enumerate(zip(out.images, paths)):
        try:
            save_png(img, path, {**parameters, "batch_index": i})
        except OSError as e:  # a full disk: say what is there, so nothing is silently half done
            written = f"; written: {', '.join(paths[:i])}" if i else ""
            raise OSError(f"writing {path}: {e.strerror or e}{written}") from e
    if args.attention_maps is not None:
        from .attention_maps import save_token_maps, token_labels

        labels = token_labels(pipe.tokenizer, args.prompt)
        for i, img in enumerate(out.images):
            folder = args.attention_maps if len(out.images) == 1 else os.path.join(args.attention_maps, str(i))
            save_token_maps(out.attention_maps[i], img, labels, folder)
    return paths


def main(argv=None) -> int:
    try:
        from .outputs import handle_sigterm  # imports torch: inside the try, so Ctrl-C while starting is one line

        handle_sigterm()  # a kill unwinds like Ctrl-C: temporaries are removed, one line is printed
        args = parse_args(argv)
        paths = run(args)
    except (ValueError, TypeError, OSError, FloatingPointError) as e:  # InputError is a ValueError and a TypeError
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, no traceback
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial output was left", file=sys.stderr)
        return 130
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
