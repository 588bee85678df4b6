"""Where do ldm_inpaint and diffusers part ways? Both pipelines run on the same weights, inputs and seed, and a
table gives the largest difference at every stage that one part hands to the next.

    python -m ldm_inpaint.parity MODEL [--prompt ...] [--steps 5] [--modules]   # exit 0: all agree, 1: one differs
    report = compare("path/to/folder", steps=3, modules=True)
    print(report.format()); report.first_difference; report.first_module_difference

Nothing is re-implemented: forward hooks on each side's text encoder(s), VAE encoder and decoder and UNet record
what they are given and what they return, and `callback_on_step_end` records the latents after each step. With
`modules=True`, hooks on the parts of the UNet (conv_in, every ResBlock, transformer and resampler of every
block, every block, conv_out) show where inside the first UNet call the two first disagree. Our parts are
matched to diffusers' through the weight key table (weights_convert/unet.py): the diffusers module that holds a
part's weights is the same part, also where the names differ (mid_block.resnet_1 = mid_block.resnets.0).

diffusers and transformers are test references: only this debugger imports them, and only when it runs.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from weights_convert.unet import diffusers_keys

from . import schedulers
from .family import TASKS
from .image import load_image, round_size
from .loading import load_pipeline
from .models.unet import ResBlock, SpatialTransformer

# (family, task) → the diffusers pipeline that does the same
DIFFUSERS_PIPELINES = {
    ("sd15", "txt2img"): "StableDiffusionPipeline",
    ("sd15", "img2img"): "StableDiffusionImg2ImgPipeline",
    ("sd15", "inpaint"): "StableDiffusionInpaintPipeline",
    ("sdxl", "txt2img"): "StableDiffusionXLPipeline",
    ("sdxl", "img2img"): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline",
}
TEXT_CALLS = ("prompt", "negative")  # both sides encode the prompt first, then the negative prompt
INSTALL_HINT = "the parity debugger runs diffusers beside ldm_inpaint: pip install diffusers transformers"


@dataclass
class Stage:
    """One compared tensor: its name, max |ours − diffusers| (inf when the shapes differ or a side lacks it)."""
    name: str
    diff: float
    shape: tuple[int, ...] | None
    note: str = ""

    def differs(self, tol: float) -> bool:
        return not self.diff <= tol  # NaN differs too


@dataclass
class Report:
    """Every stage in the order diffusers runs them; with modules, the UNet's modules in its first call in the
    order ours runs them (a block after its ResBlocks and transformers)."""
    title: str
    tol: float
    stages: list[Stage]
    modules: list[Stage] = field(default_factory=list)

    @property
    def first_difference(self) -> Stage | None:
        return next((s for s in self.stages if s.differs(self.tol)), None)

    @property
    def first_module_difference(self) -> Stage | None:
        return next((s for s in self.modules if s.differs(self.tol)), None)

    @property
    def first_block_difference(self) -> str | None:
        """The block (down_blocks.i, mid_block, up_blocks.i) that holds the first differing module, or that
        module itself (conv_in, conv_out)."""
        first = self.first_module_difference
        block = None if first is None else _BLOCK.match(first.name)
        return block[0] if block else first and first.name

    @property
    def ok(self) -> bool:
        return self.first_difference is None and self.first_module_difference is None

    def format(self) -> str:
        lines = [self.title, ""] + _table(self.stages, self.tol, "stage")
        first = self.first_difference
        lines.append(f"all {len(self.stages)} stages agree within {self.tol:g}" if first is None else
                     f"first difference beyond {self.tol:g}: {first.name} ({_number(first.diff)})")
        if self.modules:
            lines += ["", "UNet modules in the first call (ours = diffusers' where the names differ):"]
            lines += _table(self.modules, self.tol, "module")
            first, block = self.first_module_difference, self.first_block_difference
            lines.append(f"all {len(self.modules)} modules agree within {self.tol:g}" if first is None else
                         f"first module beyond {self.tol:g}: {first.name} ({_number(first.diff)})"
                         + (f", in {block}" if block != first.name else ""))
        return "\n".join(lines)


def _number(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def _table(stages: list[Stage], tol: float, heading: str) -> list[str]:
    shapes = ["" if s.shape is None else "x".join(map(str, s.shape)) for s in stages]
    w, ws = max(len(heading), *(len(s.name) for s in stages)), max(5, *map(len, shapes))
    lines = [f"{heading:<{w}}  {'shape':<{ws}}  {'max |diff|':>10}"]
    for s, shape in zip(stages, shapes):
        diff = "-" if s.shape is None else _number(s.diff)
        flag = "  DIFFERS" if s.differs(tol) else ""
        lines.append(f"{s.name:<{w}}  {shape:<{ws}}  {diff:>10}{flag}{'  ' + s.note if s.note else ''}".rstrip())
    return lines


def _stage(name: str, ours: torch.Tensor | None, theirs: torch.Tensor | None) -> Stage:
    if ours is None or theirs is None:
        return Stage(name, math.inf, None, "diffusers only" if ours is None else "ours only")
    if ours.shape != theirs.shape:
        return Stage(name, math.inf, tuple(ours.shape), f"diffusers' shape {tuple(theirs.shape)}")
    diff = (ours.double() - theirs.double()).abs().max().item() if ours.numel() else 0.0
    return Stage(name, diff, tuple(ours.shape))


def _stages(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], order: dict) -> list[Stage]:
    names = list(order) + [n for n in {**ours, **theirs} if n not in order]
    return [_stage(n, ours.get(n), theirs.get(n)) for n in names]


# -- recording -------------------------------------------------------------------------------------------------
class Recorder:
    """One side's tensors by stage name, in the order first recorded (a later call under the same name is not
    kept), and the hooks that record them."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.calls: Counter = Counter()
        self.handles: list = []

    def put(self, name: str, x) -> None:
        if name not in self.tensors:
            self.tensors[name] = _first_tensor(x).detach().cpu()

    def call(self, what: str) -> int:
        """How many calls of `what` came before this one."""
        self.calls[what] += 1
        return self.calls[what] - 1

    def after(self, module: torch.nn.Module, fn) -> None:
        """fn(args, kwargs, output) after every forward of `module`, until `remove`."""
        self.handles.append(module.register_forward_hook(lambda m, a, k, out: fn(a, k, out), with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def step_callback(self, pipe, i: int, t, tensors: dict) -> dict:
        """callback_on_step_end, on both sides: the latents after step i (after the known-region blend)."""
        self.put(f"step {i}: latents", tensors["latents"])
        return tensors


def _first_tensor(x):
    """The tensor in a module's output: diffusers' blocks return (hidden, skips), its models tuples."""
    while not isinstance(x, torch.Tensor):
        x = x[0]
    return x


def _arg(args: tuple, kwargs: dict, i: int, name: str):
    return args[i] if len(args) > i else kwargs.get(name)


def _put_text(rec: Recorder, encoder: str, ids: torch.Tensor, hidden: torch.Tensor, pooled) -> None:
    call = rec.call(encoder)
    call = TEXT_CALLS[call] if call < len(TEXT_CALLS) else f"call {call}"
    rec.put(f"token ids ({encoder}, {call})", ids)
    rec.put(f"text embeddings ({encoder}, {call})", hidden)
    if pooled is not None:
        rec.put(f"pooled ({encoder}, {call})", pooled)


def _put_unet(rec: Recorder, sample, t, context, text_embeds, time_ids, output) -> None:
    i = rec.call("unet")
    if i == 0:  # what stays the same over the loop, and the start
        rec.put("unet context", context)
        if text_embeds is not None:
            rec.put("unet text_embeds", text_embeds)
            rec.put("unet time_ids", time_ids)
        rec.put("start latents", sample[:, :4])  # as the UNet sees them: scaled by the scheduler
        if sample.shape[1] == 9:  # [latents, mask, masked-image latents]
            rec.put("masked-image latents", sample[:, 5:])
            rec.put("mask", sample[:, 4:5])
    rec.put(f"step {i}: timestep", torch.as_tensor(t).reshape(-1))
    rec.put(f"step {i}: unet output", output)


def _hook_ours(pipe, rec: Recorder) -> None:
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name) is not None:
            rec.after(getattr(pipe, name), lambda a, k, out, name=name: _put_text(
                rec, name, _arg(a, k, 0, "input_ids"), out.hidden, out.pooled))
    rec.after(pipe.vae.encoder, lambda a, k, out: _put_vae_encoder(rec, _arg(a, k, 0, "x"), out))
    rec.after(pipe.unet, lambda a, k, out: _put_unet(
        rec, _arg(a, k, 0, "x"), _arg(a, k, 1, "t"), _arg(a, k, 2, "context"), k.get("text_embeds"),
        k.get("time_ids"), out))
    rec.after(pipe.vae.decoder, lambda a, k, out: rec.put("decoded image", out))


def _hook_diffusers(pipe, family, rec: Recorder) -> None:
    def text(name):
        def record(a, k, out):
            # the hidden state diffusers conditions on: SD 1.x the last layer after the final LayerNorm
            # (last_hidden_state), SDXL the penultimate one, not normed (Family.text_layer, text_final_norm)
            hidden = out.last_hidden_state if family.text_final_norm else out.hidden_states[family.text_layer]
            pooled = out.text_embeds if hasattr(out, "text_embeds") else None
            _put_text(rec, name, _arg(a, k, 0, "input_ids"), hidden, pooled)
        return record

    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            rec.after(getattr(pipe, name), text(name))
    rec.after(pipe.vae.encoder, lambda a, k, out: _put_vae_encoder(rec, _arg(a, k, 0, "sample"), out))

    def unet(a, k, out):
        added = k.get("added_cond_kwargs") or {}
        _put_unet(rec, _arg(a, k, 0, "sample"), _arg(a, k, 1, "timestep"), _arg(a, k, 2, "encoder_hidden_states"),
                  added.get("text_embeds"), added.get("time_ids"), out)

    rec.after(pipe.unet, unet)
    rec.after(pipe.vae.decoder, lambda a, k, out: rec.put("decoded image", out))


def _put_vae_encoder(rec: Recorder, x: torch.Tensor, moments: torch.Tensor) -> None:
    i = rec.call("vae encoder")
    rec.put(f"vae encoder {i}: image", x)
    rec.put(f"vae encoder {i}: moments", moments)


# -- the UNet's modules ------------------------------------------------------------------------------------------
_BLOCK = re.compile(r"(down_blocks|up_blocks)\.\d+|mid_block")


def unet_modules(unet) -> dict[str, str]:
    """{our name: diffusers' name} of conv_in, every ResBlock, transformer and resampler, every block, conv_out.
    Blocks carry diffusers' names; any other module's counterpart is the diffusers module that holds its weights
    under the key table: the common prefix of their diffusers keys (a resampler's sit in `downsamplers.0.conv`)."""
    keys = diffusers_keys(unet.cfg)
    modules = {}
    for name, module in unet.named_modules():
        if _BLOCK.fullmatch(name):
            modules[name] = name
        elif (name in ("conv_in", "conv_out") or isinstance(module, (ResBlock, SpatialTransformer))
              or name.endswith((".downsample", ".upsample"))):
            prefixes = [keys[f"{name}.{p}"].split(".")[:-1] for p, _ in module.named_parameters()]
            modules[name] = ".".join(os.path.commonprefix(prefixes))
    return modules


def _hook_modules(ours_unet, theirs_unet, modules: dict[str, str], ours: Recorder, theirs: Recorder) -> None:
    """Record each module's output under our name; the first UNet call only (Recorder keeps first values)."""
    for name, diffusers_name in modules.items():
        label = name if name == diffusers_name else f"{name} = {diffusers_name}"
        ours.after(ours_unet.get_submodule(name), lambda a, k, out, label=label: ours.put(label, out))
        theirs.after(theirs_unet.get_submodule(diffusers_name), lambda a, k, out, label=label: theirs.put(label, out))


# -- inputs ------------------------------------------------------------------------------------------------------
def picture(width: int, height: int) -> Image.Image:
    """A smooth colourful test picture (smooth, so that resizing it is well defined)."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([0.5 + 0.5 * np.sin(2 * np.pi * (x + 0.6 * y) + phase) for phase in (0.0, 2.1, 4.2)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def box_mask(width: int, height: int) -> Image.Image:
    """White (repaint) box over the middle half of each side, on black (keep)."""
    m = np.zeros((height, width), dtype=np.uint8)
    m[height // 4:height - height // 4, width // 4:width - width // 4] = 255
    return Image.fromarray(m)


def _diffusers():
    try:
        import diffusers
        import transformers  # noqa: F401  (diffusers' pipelines need it for the text encoders)
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return diffusers


def load_reference(model: str | os.PathLike, family_name: str, task: str, device: str | torch.device = "cpu"):
    """diffusers' pipeline for `task` on the folder (or hub repo id) `model`, fp32, no safety checker or
    watermark, progress bar off."""
    from .hub import resolve

    cls = getattr(_diffusers(), DIFFUSERS_PIPELINES[family_name, task])
    extra = dict(add_watermarker=False) if family_name == "sdxl" else dict(safety_checker=None,
                                                                           requires_safety_checker=False)
    pipe = cls.from_pretrained(resolve(model), dtype=torch.float32, **extra).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_scheduler(name: str | None, reference):
    """diffusers' scheduler for a name from schedulers.available(): the class our name stands for (by the
    table of checkpoint classes) on the checkpoint's config, with the fields the name implies; None: its own."""
    if name is None:
        return reference.scheduler
    cls, implied = schedulers.SCHEDULERS[name]
    diffusers_name = next(k for k, v in schedulers.DIFFUSERS_CLASSES.items() if v is cls)
    return getattr(_diffusers(), diffusers_name).from_config(reference.scheduler.config, **implied)


# -- the comparison ----------------------------------------------------------------------------------------------
def compare(model: str | os.PathLike, *, prompt: str = "a red brick wall", negative_prompt: str | None = None,
            image: Image.Image | None = None, mask: Image.Image | None = None, task: str | None = None,
            scheduler: str | None = None, steps: int = 5, guidance_scale: float | None = None,
            strength: float | None = None, num_images: int = 1, height: int | None = None, width: int | None = None,
            seed: int = 0, tol: float = 1e-4, modules: bool = False, device: str | torch.device = "cpu",
            pipeline=None, reference=None) -> Report:
    """Run diffusers and ldm_inpaint on the same model, inputs and seed (fp32) and compare every stage.

    Args:
        model: a diffusers-layout folder or hub repo id.
        prompt, negative_prompt, guidance_scale, strength, num_images (num_images_per_prompt): as the
            pipelines take them; None leaves each side at its own default (which should agree).
        image, mask: PIL images; default a generated picture (`picture`) and a centred box (`box_mask`)
            where the task needs them.
        task: "txt2img", "img2img" or "inpaint"; default inpaint for a 9-channel UNet, else what the given
            image and mask imply (txt2img without them).
        scheduler: a name from `ldm_inpaint.schedulers.available()`, diffusers running its equivalent class on
            the checkpoint's config; None: the checkpoint's own on both sides.
        steps: num_inference_steps.
        height, width: default the image's size (rounded down to a multiple of 8), else the model's.
        seed: both sides get `torch.Generator().manual_seed(seed)`.
        tol: the largest max |difference| that counts as agreement.
        modules: also compare the outputs of the UNet's modules (`unet_modules`) in its first call.
        pipeline: our already loaded (say, deliberately altered) pipeline instead of loading `model`.
        reference: diffusers' already loaded pipeline for the task; its scheduler is put back afterwards.
    """
    for name, value in (("steps", steps), ("num_images", num_images)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number ≥ 1, got {value!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be a number ≥ 0, got {tol}")
    if mask is not None and image is None:
        raise ValueError("a mask needs an image: give --image as well")
    if scheduler is not None and scheduler not in schedulers.SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; available: {', '.join(schedulers.available())}")
    if reference is None and os.path.isfile(model):
        raise ValueError(f"{model} is a single file: the parity debugger needs a diffusers-layout folder or hub "
                         "repo id, which diffusers loads as it is")
    _diffusers()  # fail before loading anything when diffusers is missing
    ours = pipeline if pipeline is not None else load_pipeline(model, device=device)
    task = task or _default_task(ours, image, mask)
    _check_task(ours, task, image, mask)
    image, mask, height, width = _inputs(ours, task, image, mask, height, width)

    ref = reference if reference is not None else load_reference(model, ours.family.name, task, device)
    expected = DIFFUSERS_PIPELINES[ours.family.name, task]
    if type(ref).__name__ != expected:
        raise ValueError(f"reference is a {type(ref).__name__}; {task} on this model compares with {expected}")
    theirs_scheduler = _diffusers_scheduler(scheduler, ref)

    kwargs = dict(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                  num_images_per_prompt=num_images, height=height, width=width)
    kwargs |= {k: v for k, v in dict(guidance_scale=guidance_scale, strength=strength).items() if v is not None}
    if image is not None:
        kwargs["image"] = image
    if mask is not None:
        kwargs["mask_image"] = mask

    theirs_rec, ours_rec = Recorder(), Recorder()
    theirs_modules, ours_modules = Recorder(), Recorder()
    _hook_diffusers(ref, ours.family, theirs_rec)
    _hook_ours(ours, ours_rec)
    if modules:
        _hook_modules(ours.unet, ref.unet, unet_modules(ours.unet), ours_modules, theirs_modules)
    checkpoint_scheduler, ref.scheduler = ref.scheduler, theirs_scheduler
    try:
        theirs_out = ref(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="np",
                         callback_on_step_end=theirs_rec.step_callback).images
        ours_out = ours(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="np",
                        scheduler=scheduler, progress=False, callback_on_step_end=ours_rec.step_callback).images
    finally:
        ref.scheduler = checkpoint_scheduler
        for rec in (theirs_rec, ours_rec, theirs_modules, ours_modules):
            rec.remove()
    theirs_rec.put("output image", torch.from_numpy(np.asarray(theirs_out)))
    ours_rec.put("output image", torch.from_numpy(np.asarray(ours_out)))

    title = (f"ldm_inpaint vs diffusers {_diffusers().__version__} ({expected}): {_model_name(model)}, {task}, "
             f"steps {steps}, scheduler {scheduler or ours.scheduler_config.get('_class_name')}, seed {seed}")
    return Report(title, tol, _stages(ours_rec.tensors, theirs_rec.tensors, theirs_rec.tensors),
                  _stages(ours_modules.tensors, theirs_modules.tensors, ours_modules.tensors) if modules else [])


def _inputs(pipe, task: str, image, mask, height, width):
    """The task's image and mask (generated where not given) and explicit sizes for both sides: diffusers'
    inpainting defaults to the model's size, ours to the image's."""
    model_side = pipe.unet.cfg.sample_size * pipe.family.vae_scale_factor
    if task != "txt2img" and image is None:
        h, w = round_size(height or model_side, width or model_side)
        image = picture(w, h)
    if task == "inpaint" and mask is None:
        mask = box_mask(image.width, image.height)
    h, w = (image.height, image.width) if image is not None else (model_side, model_side)
    return (image, mask, *round_size(height or h, width or w))


def _model_name(model) -> str:
    return os.path.basename(os.path.normpath(os.fspath(model)))


def _default_task(pipe, image, mask) -> str:
    if pipe.unet.cfg.in_channels == 9 or mask is not None:
        return "inpaint"
    return "img2img" if image is not None else "txt2img"


def _check_task(pipe, task: str, image, mask) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if pipe.unet.cfg.in_channels == 9 and task != "inpaint":
        raise ValueError(f"{pipe.name or 'this model'} is an inpainting model (9-channel UNet): "
                         "use --task inpaint")
    if task == "txt2img" and image is not None:
        raise ValueError("txt2img takes no image: leave out --image, or use --task img2img")
    if task == "img2img" and mask is not None:
        raise ValueError("img2img takes no mask: leave out --mask, or use --task inpaint")


def _quiet() -> None:
    """The command line's output is the report: diffusers' and transformers' loading bars and notes go."""
    diffusers = _diffusers()
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# -- command line ------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, as every other usage error here
        raise ValueError(message)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m ldm_inpaint.parity", description=__doc__.splitlines()[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="a diffusers-layout folder or hub repo id (owner/name[@rev])")
    p.add_argument("--prompt", default="a red brick wall")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--image", default=None, help="input image; default a generated test picture")
    p.add_argument("--mask", default=None, help="white = repaint; default a centred box")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="default inpaint for a 9-channel UNet, else what --image / --mask imply")
    p.add_argument("--scheduler", default=None, help="a name from ldm_inpaint.schedulers.available(); "
                                                      "default: the checkpoint's own")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the pipelines' own")
    p.add_argument("--strength", type=float, default=None, help="default: the pipelines' own")
    p.add_argument("--num-images", type=int, default=1, help="num_images_per_prompt")
    p.add_argument("--height", type=int, default=None, help="default: the image's, else the model's")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4, help="largest max |difference| that counts as agreement")
    p.add_argument("--modules", action="store_true",
                   help="also compare the outputs of the UNet's blocks and their parts in its first call")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Print the report; 0 when every stage agrees within --tol, 1 when one differs, 2 for bad usage."""
    from weights_convert.common import CheckpointError

    try:
        args = parse_args(argv)
        _quiet()
        report = compare(
            args.model, prompt=args.prompt, negative_prompt=args.negative_prompt,
            image=load_image(args.image) if args.image else None, mask=load_image(args.mask) if args.mask else None,
            task=args.task, scheduler=args.scheduler, steps=args.steps, guidance_scale=args.guidance_scale,
            strength=args.strength, num_images=args.num_images, height=args.height, width=args.width,
            seed=args.seed, tol=args.tol, modules=args.modules, device=args.device)
    except (ValueError, TypeError, ImportError, FileNotFoundError, CheckpointError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, no traceback
        return 2
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
