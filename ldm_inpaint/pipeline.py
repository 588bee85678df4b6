"""Text-to-image, img2img and inpainting with one pipeline, as stages that run one way:

    request ─► prepare ─► Run(Conditioning, scheduler, start latents) ─► sample (one Step per model call) ─► finish
    (inputs,    text, mask, image latents and the start noise,             sampling.py: guidance, the        decode,
     defaults)  drawing random numbers in diffusers' order                 known-region blend               paste back

`pipe(...)` is that composition; researchers can run the stages themselves:

    run = pipe.prepare(Request("a cat", image=img, mask_image=mask))
    for step in pipe.sample(run):          # step.i, step.t, step.latents, step.x0; assign step.latents to steer
        ...
    out = pipe.finish(run, step.latents)   # or: for step in pipe.steps("a cat", image=img, mask_image=mask)

Follows Rombach et al. 2022 (latent diffusion, the 9-channel inpainting UNet) and Ho & Salimans 2022
(classifier-free guidance). Every convention that decides the output — the order in which random numbers are
drawn, the mask and image preprocessing, which timesteps `strength` skips — is diffusers', so the same seed
gives the same image (see docs/architecture.md and docs/parity.md). What differs between SD 1.x and SDXL is a
`Family` value (family.py).

Which task runs is decided by the inputs and the UNet:
    no image                        → text-to-image
    image, no mask                  → img2img
    image + mask, 9-channel UNet    → inpainting, the UNet sees [latent, mask, masked-image latent]
    image + mask, 4-channel UNet    → inpainting by re-imposing the noised known region after every step

Options that keep the input picture (mask edits, "only masked" crops, paste-back) live in inpaint.py; they
run in prepare and finish, so the sampling loop itself is unchanged by them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from . import checks, schedulers
from .attention_maps import CrossAttentionMaps
from .checks import InputError
from .family import SD15, Family
from .image import ImageInput, image_size, postprocess, preprocess_image, preprocess_mask, round_size
from .inpaint import PasteBack, blur_masks, edit_masks
from .memory import release
from .models.clip import CLIPTextModel
from .models.unet import UNet
from .models.vae import AutoencoderKL
from .noise import Generator, randn
from .sampling import Conditioning, Step, sample
from .tokenizer import tokenize

# the tensors a callback_on_step_end may ask for (diffusers' names) → the record and field that hold them
CALLBACK_TENSORS = {"latents": None, "prompt_embeds": "context", "negative_prompt_embeds": None,
                    "add_text_embeds": "pooled", "add_time_ids": "time_ids", "mask": "mask",
                    "masked_image_latents": "masked_latents"}
GUIDANCE_MAX = 100  # ComfyUI's cap too; far beyond it the guided prediction overflows to NaN
SIZE_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                     "negative_crops_coords_top_left", "negative_target_size")
SDXL_ONLY = ("prompt_2", "negative_prompt_2", *SIZE_CONDITIONING, "pooled_prompt_embeds",
             "negative_pooled_prompt_embeds")


@dataclass
class PipelineOutput:
    images: object  # list of PIL images, a float array (B, H, W, 3) in [0, 1], or latents (B, 4, H/8, W/8)
    # with return_attention_maps: (B, 77, H/8, W/8), each token's share of the cross-attention at each latent
    # pixel (the 77 values sum to 1), averaged over heads, layers and steps
    attention_maps: torch.Tensor | None = None


@dataclass
class Request:
    """One call's inputs, named and defaulted as in diffusers' Stable Diffusion pipelines; None means the
    family's default (family.py). `Pipeline.__call__` documents each field."""
    prompt: str | Sequence[str] | None = None
    image: ImageInput | None = None
    mask_image: ImageInput | None = None
    negative_prompt: str | Sequence[str] | None = None
    num_inference_steps: int = 50
    guidance_scale: float | None = None
    strength: float | None = None
    generator: Generator = None
    num_images_per_prompt: int = 1
    height: int | None = None
    width: int | None = None
    scheduler: str | Callable | None = None
    eta: float | None = None
    clip_skip: int | None = None
    guidance_rescale: float = 0.0
    # SDXL: the second text encoder's prompts and the size/crop conditioning
    prompt_2: str | Sequence[str] | None = None
    negative_prompt_2: str | Sequence[str] | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: tuple[int, int] | None = None
    # precomputed inputs, as diffusers takes them
    latents: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    # keeping the picture (inpaint.py)
    preserve_unmasked: bool = False
    mask_blur: float = 0
    mask_grow: int = 0
    invert_mask: bool = False
    padding_mask_crop: int | None = None
    masked_latents_blend: bool = False
    conventions: str | None = None  # "diffusers" (default) or "original" (family.py)
    output_type: str = "pil"
    progress: bool = True
    return_attention_maps: bool = False
    callback_on_step_end: Callable | None = None
    callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)
    scheduler_options: dict = field(default_factory=dict)  # config overrides: timestep_spacing="trailing", …

    @classmethod
    def of(cls, prompt=None, **options) -> Request:
        """A request from pipe(...)'s arguments: keywords that are scheduler config keys override its config;
        any other unknown keyword is an error naming it."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"prompt", "scheduler_options"}
        scheduler_options = {k: options.pop(k) for k in list(options) if k not in fields}
        unknown = sorted(set(scheduler_options) - schedulers.SchedulerConfig.keys())
        if unknown:
            raise InputError(f"unknown argument(s) {', '.join(unknown)}: pipe() takes diffusers' argument names "
                             "(help(Pipeline.__call__)) and scheduler config keys such as timestep_spacing")
        return cls(prompt, **options, scheduler_options=scheduler_options)


@dataclass
class Run:
    """What prepare decided: everything the loop and the decode need, as tensors and plain values."""
    request: Request
    family: Family
    task: str  # "txt2img", "img2img" or "inpaint"
    height: int
    width: int
    batch: int  # B = prompts × images per prompt
    cond: Conditioning
    scheduler: object
    latents: torch.Tensor  # (B, 4, H/8, W/8) start latents
    paste: PasteBack | None  # how the decoded images go back into the input pictures, if they do


class Pipeline:
    """Text encoder(s) + UNet + VAE + scheduler config; called like diffusers' Stable Diffusion pipelines.

    SD 1.x has one CLIP ViT-L/14 text encoder; SDXL adds OpenCLIP ViT-bigG (`text_encoder_2`), whose pooled
    output and six size/crop "time ids" condition the UNet beside the text context."""

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer,
                 scheduler_config: dict, family: Family = SD15, text_encoder_2: CLIPTextModel | None = None,
                 tokenizer_2=None, name: str = "", configs: dict[str, dict] | None = None,
                 tokenizer_folder: str | None = None):
        """`configs`: the diffusers configs it was loaded from (model_index, unet, vae, …) and
        `tokenizer_folder` the folder holding its tokenizer/ folders, if any: what a fine-tune writes back."""
        if (text_encoder_2 is not None) != (family.text_encoders == 2):
            raise InputError(f"{family.title} has {family.text_encoders} text encoder(s)")
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.scheduler_config = scheduler_config
        self.family = family
        self.name = name
        self.configs, self.tokenizer_folder = configs, tokenizer_folder
        # Each model's memory-mapped weights go back to the page cache when its stage of a call is over, so
        # the peak is that of the largest model, not of all of them; the next call maps them in again.
        self.release_weights = True
        self._interrupt = False  # a callback sets it to stop the loop, as in diffusers

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def _release(self, *models: torch.nn.Module | None) -> None:
        if self.release_weights:
            for model in models:
                if model is not None:
                    release(model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_dtype(self) -> torch.dtype:  # fp32 when an SDXL VAE's config forces it (see loading.py)
        return next(self.vae.parameters()).dtype

    # -- models -------------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], prompts_2: list[str] | None = None, clip_skip: int | None = None,
                      conventions: str = "diffusers", grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts → (context (B, 77, D), pooled (B, P) or None), as diffusers conditions each family: the
        family's text layer (SD 1.x the last, through the final LayerNorm; SDXL the penultimate of both
        encoders, not normed, concatenated to 768 + 1280 wide), or clip_skip layers earlier; pooled = encoder
        2's projected EOS token. conventions="original": the release code's tokenizer ids (tokenizer.py).
        grad=True keeps the autograd graph (training the text encoders)."""
        with torch.set_grad_enabled(grad):
            layer, norm = self.family.text_layer - (clip_skip or 0), self.family.text_final_norm
            ids = tokenize(self.tokenizer, prompts, conventions).to(_device_of(self.text_encoder))
            hidden = self.text_encoder(ids, hidden_layer=layer, final_norm=norm).hidden
            if self.text_encoder_2 is None:
                return hidden.to(self.device, self.dtype), None
            ids_2 = tokenize(self.tokenizer_2, prompts_2 or prompts, conventions).to(_device_of(self.text_encoder_2))
            out_2 = self.text_encoder_2(ids_2, hidden_layer=layer, final_norm=norm, pooled=True)
            context = torch.cat([hidden.to(out_2.hidden.device), out_2.hidden], dim=-1)
            return context.to(self.device, self.dtype), out_2.pooled.to(self.device, self.dtype)

    @torch.no_grad()
    def encode_image(self, x: torch.Tensor, generator: Generator, sample: bool = True) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] → scaled latents, sampled from the posterior (not its mean), one
        image at a time with its own generator when a list is given; sample=False: the mean, drawing nothing."""
        x = x.to(self.device, self.vae_dtype)
        if not sample:
            z = self.vae.encode(x).mode()
        elif isinstance(generator, (list, tuple)):
            z = torch.cat([self.vae.encode(x[i:i + 1]).sample(generator[i]) for i in range(x.shape[0])])
        else:
            z = self.vae.encode(x).sample(generator)
        return self.vae.cfg.scaling_factor * z.to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae_dtype) / self.vae.cfg.scaling_factor)

    def load_lora(self, path, scale: float = 1.0) -> None:
        """Merge a LoRA file (kohya / A1111 / ComfyUI, or diffusers' layout) into the UNet and text encoder
        weights, `scale` times; several files stack. See lora.py."""
        from .lora import load_lora

        load_lora(self, path, scale)

    # -- the call -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] | None = None, **options) -> PipelineOutput:
        """Generate images. Arguments are named, and default, as in diffusers' Stable Diffusion pipelines.

        Args:
            prompt: a string or one string per batch item (or None with prompt_embeds).
            image: the input image(s) for img2img and inpainting (PIL, numpy in [0, 1] or uint8, or a tensor).
            mask_image: white (≥ 0.5) = repaint, black = keep; any PIL mode, numpy or tensor.
            negative_prompt: what to steer away from; a string or one per prompt (default "", and for SDXL
                zero embeddings).
            num_inference_steps: denoising steps before `strength` cuts them.
            guidance_scale: classifier-free guidance weight; off at ≤ 1. Default 7.5 (5.0 for SDXL
                text-to-image and img2img).
            strength: the fraction of the schedule run from the noised input image. Default 1.0 for inpainting
                (0.9999 for SDXL, as diffusers: it skips the first step), 0.8 for img2img (0.3 for SDXL).
            generator: a torch.Generator, or one per output image.
            num_images_per_prompt: images per prompt.
            height, width: output size; default the input image's size, else the model's; rounded down to a
                multiple of 8.
            scheduler: a name from `ldm_inpaint.schedulers.available()`, a scheduler class, or None for the
                checkpoint's own (scheduler/scheduler_config.json); `eta` and other keyword arguments override
                its config.
            clip_skip: use the text encoder's output this many layers before the usual one.
            guidance_rescale: φ of Lin et al. 2023 (§3.4): rescale the guided prediction towards the text
                prediction's standard deviation.
            prompt_2, negative_prompt_2: SDXL's second text encoder's prompts (default: the first ones).
            original_size, crops_coords_top_left, target_size (and negative_ forms): SDXL size and crop
                conditioning (Podell et al. 2023 §2.2), (height, width) and (top, left).
            latents: start latents (B, 4, H/8, W/8) instead of drawn noise; text-to-image and inpainting scale
                them by the scheduler's init_noise_sigma, img2img starts from them as they are (diffusers' rules).
            prompt_embeds, negative_prompt_embeds: text contexts (B, 77, D) instead of prompts; SDXL also takes
                pooled_prompt_embeds and negative_pooled_prompt_embeds (B, P).
            preserve_unmasked: return the input picture, at its own size, byte for byte wherever the mask is 0
                and farther than 4·mask_blur + 2 px from it; the generated pixels on the mask; a smooth blend
                between (see docs/inpainting.md).
            mask_blur: Gaussian blur of the mask, px (diffusers' `mask_processor.blur(mask, blur_factor)`).
            mask_grow: grow the mask by this many px; negative shrinks it. An empty result is an error.
            invert_mask: repaint the black part instead of the white.
            padding_mask_crop: inpaint only a box around the mask plus this many px of context, resized to
                height × width (default: the model's size, 512 or 1024, as diffusers), and paste the result
                back into the full-size picture (diffusers' padding_mask_crop; a padding past the image's
                edges is clamped to them).
            masked_latents_blend: 9-channel models: also re-impose the known region's latents after each step,
                as 4-channel models always do, so the unmasked area drifts less before the decode.
                Off by default (diffusers' behaviour); a no-op for 4-channel models.
            conventions: "original" reproduces the release code's (ldm / sgm) numbers where diffusers differs
                (docs/parity.md); default "diffusers".
            output_type: "pil", "np" (float array (B, H, W, 3) in [0, 1]) or "latent".
            progress: show a progress bar.
            return_attention_maps: also return each prompt token's cross-attention map (PipelineOutput).
            callback_on_step_end: fn(pipe, i, t, tensors) → dict, called after every step with the tensors named
                in callback_on_step_end_tensor_inputs (diffusers' names: latents, prompt_embeds, mask, …); a
                returned tensor replaces the current one. Setting `pipe._interrupt = True` stops the loop there.
            Other keyword arguments override the scheduler's config (timestep_spacing="trailing", …).
        """
        run = self.prepare(Request.of(prompt, **options))
        req, latents = run.request, run.latents
        self._interrupt = False
        maps = None
        if req.return_attention_maps:
            maps = CrossAttentionMaps(self.unet, tuple(latents.shape[-2:]))
        with maps if maps is not None else contextlib.nullcontext():
            for step in self.sample(run):
                if req.callback_on_step_end is not None:
                    self._callback(run, step)
                latents = step.latents
                if self._interrupt:
                    break
        self._release(self.unet)
        out = self.finish(run, latents)
        if maps is not None:  # the text-conditioned half of a guided batch
            out.attention_maps = maps.maps()[-run.batch:]
        return out

    def steps(self, prompt: str | Sequence[str] | None = None, **options) -> Iterator[Step]:
        """The sampling loop of `pipe(prompt, **options)`, one Step per model call (see sampling.Step)."""
        return self.sample(self.prepare(Request.of(prompt, **options)))

    # -- stage 1: inputs → Run ----------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, req: Request) -> Run:
        """Defaults and checks, the mask edits, the text conditioning, the schedule, then the image latents
        and the start latents. Nothing after this stage looks at a PIL image or an option."""
        task = "txt2img" if req.image is None else ("img2img" if req.mask_image is None else "inpaint")
        family = self.family.with_conventions(req.conventions)
        req = dataclasses.replace(
            req, guidance_scale=family.guidance_scale[task] if req.guidance_scale is None else req.guidance_scale,
            strength=family.strength[task] if req.strength is None else req.strength)
        req = self._check(task, req)
        prompts, batch = self._prompts(req)
        image, mask_image, paste = req.image, req.mask_image, None
        height, width = req.height, req.width
        if height is None or width is None:  # the crop is resized to the model's size, as diffusers does
            h0, w0 = (image_size(image) if image is not None and req.padding_mask_crop is None
                      else (self.unet.cfg.sample_size * family.vae_scale_factor,) * 2)
            height, width = height or h0, width or w0
        height, width = round_size(height, width)
        checks.check_memory(height, width, batch, self.vae_dtype)  # before anything of that size is allocated

        # the mask as edited (invert, grow, then blur), and how the result goes back into the input picture;
        # padding_mask_crop: from here on, image and mask are the box around the mask, at height × width
        if task == "inpaint":
            mask_image = edit_masks(mask_image, req.invert_mask, req.mask_grow)
            if req.preserve_unmasked or req.padding_mask_crop is not None:
                paste = PasteBack.build(image, mask_image, req.preserve_unmasked, req.mask_blur)
            mask_image = blur_masks(mask_image, req.mask_blur)
            if req.padding_mask_crop is not None:
                image, mask_image = paste.crop(image, mask_image, width, height, req.padding_mask_crop)

        cond = self._text_conditioning(req, family, task, prompts, batch, (height, width))
        self._release(self.text_encoder, self.text_encoder_2)
        options = dict(req.scheduler_options, **({} if req.eta is None else {"eta": req.eta}))
        scheduler = schedulers.create(req.scheduler or schedulers.from_checkpoint(self.scheduler_config),
                                      self.scheduler_config, req.num_inference_steps, req.strength,
                                      conventions=family.conventions, **options)
        latents = self._start_latents(req, task, cond, scheduler, image, mask_image, batch, height, width)
        self._release(self.vae.encoder)
        return Run(req, family, task, height, width, batch, cond, scheduler, latents, paste)

    def _prompts(self, req: Request) -> tuple[list[str] | None, int]:
        """The prompt list (None with prompt_embeds) and the batch B = prompts × images per prompt."""
        if req.prompt_embeds is not None:
            return None, req.prompt_embeds.shape[0] * req.num_images_per_prompt
        prompts = _as_prompts(req.prompt, "prompt")
        batch = len(prompts) * req.num_images_per_prompt
        if isinstance(req.generator, (list, tuple)) and len(req.generator) != batch:
            raise InputError(f"{len(req.generator)} generators for {batch} images: give one per image or a single one")
        return prompts, batch

    def _text_conditioning(self, req: Request, family: Family, task: str, prompts: list[str] | None, batch: int,
                           size: tuple[int, int]) -> Conditioning:
        """Context (N, 77, D), and for SDXL pooled (N, P) and time ids (N, 6): N = 2B with guidance, the
        unconditional rows first. Negatives are encoded without clip_skip, as diffusers does."""
        guided = req.guidance_scale > 1.0
        if req.prompt_embeds is not None:
            context, pooled = req.prompt_embeds, req.pooled_prompt_embeds
            prompts = [""] * context.shape[0]  # the count, for matching the negative prompts
        else:
            prompts_2 = None if req.prompt_2 is None else _matching(req.prompt_2, prompts, "prompt_2")
            context, pooled = self.encode_prompt(prompts, prompts_2, req.clip_skip, family.conventions)
        if guided:
            if req.negative_prompt_embeds is not None:
                uncond, uncond_pooled = req.negative_prompt_embeds, req.negative_pooled_prompt_embeds
            elif family.zero_negatives and req.negative_prompt is None:
                uncond, uncond_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
            else:
                negatives = _matching("" if req.negative_prompt is None else req.negative_prompt, prompts,
                                      "negative_prompt")
                negatives_2 = negatives if req.negative_prompt_2 is None else _matching(
                    req.negative_prompt_2, prompts, "negative_prompt_2")
                uncond, uncond_pooled = self.encode_prompt(negatives, negatives_2, conventions=family.conventions)
            context = torch.cat([uncond.to(context), context])
            pooled = None if pooled is None else torch.cat([uncond_pooled.to(pooled), pooled])
        n = req.num_images_per_prompt
        cond = Conditioning(context=context.to(self.device, self.dtype).repeat_interleave(n, dim=0),  # halves kept
                            guidance_scale=req.guidance_scale, guidance_rescale=req.guidance_rescale)
        if family.time_ids:
            time_ids = _time_ids(task, size, req.original_size, req.crops_coords_top_left, req.target_size,
                                 req.negative_original_size, req.negative_crops_coords_top_left,
                                 req.negative_target_size)
            time_ids = torch.tensor(time_ids if guided else time_ids[1:], dtype=self.dtype, device=self.device)
            cond.pooled = pooled.to(self.device, self.dtype).repeat_interleave(n, dim=0)
            cond.time_ids = time_ids.repeat_interleave(batch, dim=0)
        return cond

    def _start_latents(self, req: Request, task: str, cond: Conditioning, scheduler, image, mask_image,
                       batch: int, height: int, width: int) -> torch.Tensor:
        """The image latents, the start latents and the inpainting inputs, drawing random numbers in
        diffusers' order: (1) the image's posterior sample, when the start or the blend needs it; (2) the start
        noise, unless `latents` were given; (3) the masked image's posterior sample. Fills cond's mask,
        masked_latents, known and noise; returns the start latents (B, 4, H/8, W/8)."""
        f = self.family.vae_scale_factor
        shape = (batch, self.family.latent_channels, height // f, width // f)
        device, dtype, generator = self.device, self.dtype, req.generator
        inpainting_unet = self.unet.cfg.in_channels == 9
        given = None if req.latents is None else req.latents.to(device, dtype)
        if given is not None and given.shape != shape:
            raise InputError(f"latents have shape {tuple(given.shape)}, expected {shape} for {batch} image(s) of "
                             f"{width}x{height}")
        image_latents = None
        if task == "img2img":
            if given is not None:  # diffusers' SDXL img2img: the given latents are the start, used as they are
                return given
            x = preprocess_image(image, height, width)
            if isinstance(generator, (list, tuple)):  # diffusers repeats the images first, then encodes each
                x = x.repeat(batch // x.shape[0], 1, 1, 1)
            image_latents = _expand(self.encode_image(x, generator), batch)
            return scheduler.add_noise(image_latents, randn(shape, generator, device, dtype), 0)

        if task == "inpaint":
            x = preprocess_image(image, height, width)
            mask_px = preprocess_mask(mask_image, height, width)
            # 4-channel models blend with the image latents; a 9-channel one needs them to start part-way
            # (diffusers encodes them only when it will use them: given latents always start from noise)
            if not inpainting_unet or (req.strength < 1.0 and given is None):
                image_latents = _expand(self.encode_image(x, generator), batch)
        noise = randn(shape, generator, device, dtype) if given is None else given
        if req.strength == 1.0 or given is not None:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, 0)
        if task == "inpaint":
            masked = x * (mask_px < 0.5)  # repainted pixels become 0, mid-grey
            masked_latents = _expand(self.encode_image(masked, generator), batch)
            mask = _expand(torch.nn.functional.interpolate(mask_px, size=shape[-2:]), batch).to(device, dtype)
            copies = 2 if cond.guided else 1  # as the UNet batch: both halves of a guided batch
            cond.mask = torch.cat([mask] * copies)
            if inpainting_unet:
                cond.masked_latents = torch.cat([masked_latents] * copies)
            if not inpainting_unet or req.masked_latents_blend:
                if image_latents is None:  # the mean: no random number drawn
                    image_latents = _expand(self.encode_image(x, generator, sample=False), batch)
                cond.known, cond.noise = image_latents, noise
        return latents

    # -- stage 2: the loop --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, run: Run) -> Iterator[Step]:
        """The denoising loop of a prepared run (sampling.sample on this pipeline's UNet)."""
        req = run.request
        yield from sample(self.unet, run.latents, run.cond, run.scheduler, req.generator, req.progress,
                          self.name or "sampling")

    def _callback(self, run: Run, step: Step) -> None:
        """diffusers' callback_on_step_end: the named tensors in, the returned ones replace the current ones
        (negative_prompt_embeds is read-only, as in diffusers, where it is already inside prompt_embeds)."""
        cond = run.cond
        current = {"latents": step.latents, "negative_prompt_embeds": cond.context[:run.batch] if cond.guided
                   else None}
        current.update({name: getattr(cond, attr) for name, attr in CALLBACK_TENSORS.items() if attr})
        names = run.request.callback_on_step_end_tensor_inputs
        returned = run.request.callback_on_step_end(self, step.i, step.t, {k: current[k] for k in names}) or {}
        for name, value in returned.items():
            if name == "latents":
                step.latents = value
            elif CALLBACK_TENSORS.get(name):
                setattr(cond, CALLBACK_TENSORS[name], value)

    # -- stage 3: latents → pictures ----------------------------------------------------------------------
    @torch.no_grad()
    def finish(self, run: Run, latents: torch.Tensor) -> PipelineOutput:
        """Decode, and paste back into the input pictures at their own size when asked."""
        output_type = run.request.output_type
        if output_type == "latent":
            return PipelineOutput(images=latents)
        decoded = self.decode(latents)
        self._release(self.vae.decoder)
        if run.paste is None:
            return PipelineOutput(images=postprocess(decoded, output_type))
        images = run.paste(postprocess(decoded, "pil"))
        if output_type == "np":
            images = np.stack([np.asarray(i, dtype=np.float32) / 255 for i in images])
        return PipelineOutput(images=images)

    # -- checks -------------------------------------------------------------------------------------------
    def _check(self, task: str, req: Request) -> Request:
        """The request with every number checked (checks.number: type, finite, range) and made a plain int or
        float, or an InputError naming the argument."""
        number = checks.number
        image, mask_image = req.image, req.mask_image
        if mask_image is not None and image is None:
            raise InputError("mask_image was given without image: pass the image to inpaint as well")
        if task == "inpaint" and image_size(image) != image_size(mask_image, "mask_image"):
            (h, w), (mh, mw) = image_size(image), image_size(mask_image, "mask_image")
            raise InputError(f"image is {w}x{h} but mask_image is {mw}x{mh}: give a mask of the image's size")
        if self.unet.cfg.in_channels == 9 and task != "inpaint":
            raise InputError(f"{self.name or 'this'} is an inpainting model (9-channel UNet): give both an image "
                             "and a mask (image= and mask_image=, or --image and --mask)")
        steps_max = self.scheduler_config.get("num_train_timesteps", 1000)
        req = dataclasses.replace(
            req,
            num_inference_steps=number(req.num_inference_steps, "num_inference_steps", integer=True, low=1,
                                       high=steps_max),
            guidance_scale=number(req.guidance_scale, "guidance_scale", low=0, high=GUIDANCE_MAX),
            guidance_rescale=number(req.guidance_rescale, "guidance_rescale", low=0, high=1),
            strength=number(req.strength, "strength", low=0, low_open=True, high=1),
            eta=None if req.eta is None else number(req.eta, "eta", low=0, high=1),
            num_images_per_prompt=number(req.num_images_per_prompt, "num_images_per_prompt", integer=True, low=1),
            height=None if req.height is None else number(req.height, "height", integer=True, low=8),
            width=None if req.width is None else number(req.width, "width", integer=True, low=8),
            clip_skip=None if req.clip_skip is None else number(
                req.clip_skip, "clip_skip", integer=True, low=0, high=self._clip_skip_max()),
            padding_mask_crop=None if req.padding_mask_crop is None else number(
                req.padding_mask_crop, "padding_mask_crop", integer=True, low=0),
            **{name: checks.size_pair(getattr(req, name), name) for name in SIZE_CONDITIONING},
        )
        if task == "txt2img" and req.strength != 1.0:
            raise InputError("strength applies only when an image is given")
        if req.output_type not in ("pil", "np", "latent"):
            raise InputError(f"output_type must be 'pil', 'np' or 'latent', got {req.output_type!r}")
        _check_generator(req.generator)
        if req.latents is not None:
            checks.tensor(req.latents, "latents", "(batch, channels, height/8, width/8)")
        if self.family.text_encoders == 1:
            sdxl_only = [name for name in SDXL_ONLY if getattr(req, name) not in (None, (0, 0))]
            if sdxl_only:
                raise InputError(f"{', '.join(sdxl_only)}: SDXL-only argument(s), and this is an "
                                 f"{self.family.title} model; leave them out")
        self._check_embeds(req)
        unknown = [k for k in req.callback_on_step_end_tensor_inputs if k not in CALLBACK_TENSORS]
        if unknown:
            raise InputError(f"callback_on_step_end_tensor_inputs {unknown} unknown; choose from "
                             f"{list(CALLBACK_TENSORS)}")
        self._check_picture_options(task, req)
        return req

    def _clip_skip_max(self) -> int:
        """clip_skip may go back to the token embeddings' layer, no further."""
        layers = len(self.text_encoder.layers)
        return layers + 1 + self.family.text_layer

    def _check_embeds(self, req: Request) -> None:
        if (req.prompt is None) == (req.prompt_embeds is None):
            raise InputError("give either prompt or prompt_embeds (one of them, not both)")
        if req.negative_prompt is not None and req.negative_prompt_embeds is not None:
            raise InputError("give either negative_prompt or negative_prompt_embeds, not both")
        pooled = self.family.text_encoders == 2
        for embeds, pooled_embeds, name in ((req.prompt_embeds, req.pooled_prompt_embeds, "prompt_embeds"),
                                            (req.negative_prompt_embeds, req.negative_pooled_prompt_embeds,
                                             "negative_prompt_embeds")):
            if embeds is None:
                continue
            if pooled and pooled_embeds is None:
                raise InputError(f"SDXL needs {name.replace('prompt', 'pooled_prompt', 1)} with {name}")
            checks.tensor(embeds, name, "(batch, tokens, width)")
            if pooled_embeds is not None:
                checks.tensor(pooled_embeds, name.replace("prompt", "pooled_prompt", 1), "(batch, width)")
        if (req.negative_prompt_embeds is not None and req.prompt_embeds is not None
                and req.negative_prompt_embeds.shape != req.prompt_embeds.shape):
            raise InputError(f"negative_prompt_embeds {tuple(req.negative_prompt_embeds.shape)} must have "
                             f"prompt_embeds' shape {tuple(req.prompt_embeds.shape)}")

    def _check_picture_options(self, task: str, req: Request) -> None:
        used = [name for name, v in [("preserve_unmasked", req.preserve_unmasked), ("mask_blur", req.mask_blur),
                                     ("mask_grow", req.mask_grow), ("invert_mask", req.invert_mask),
                                     ("padding_mask_crop", req.padding_mask_crop is not None),
                                     ("masked_latents_blend", req.masked_latents_blend)] if v]
        if used and task != "inpaint":
            raise InputError(f"{', '.join(used)} need(s) an image and a mask_image (inpainting)")
        if (req.preserve_unmasked or req.padding_mask_crop is not None) and req.output_type == "latent":
            raise InputError("preserve_unmasked and padding_mask_crop paste pixels back: use output_type "
                             "'pil' or 'np', not 'latent'")
        checks.number(req.mask_blur, "mask_blur", low=0)
        checks.number(req.mask_grow, "mask_grow", integer=True)


def _time_ids(task, size, original_size, crops, target_size, neg_original_size, neg_crops, neg_target_size):
    """SDXL's [negative, positive] size conditioning rows: (orig_h, orig_w, crop_top, crop_left, target_h,
    target_w). diffusers' text-to-image pipeline reuses the positive row unless both negative sizes are given;
    its img2img/inpaint pipelines always build the negative row, but with the positive crop (a quirk kept)."""
    original_size, target_size = tuple(original_size or size), tuple(target_size or size)
    positive = [*original_size, *crops, *target_size]
    if task == "txt2img":
        if neg_original_size is None or neg_target_size is None:
            return [positive, positive]
        return [[*neg_original_size, *neg_crops, *neg_target_size], positive]
    return [[*(neg_original_size or original_size), *crops, *(neg_target_size or target_size)], positive]


def _check_generator(generator) -> None:
    items = generator if isinstance(generator, (list, tuple)) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in items):
        raise InputError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(42)) or a list "
                         f"of them, got {type(generator).__name__}")


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _as_prompts(prompt: str | Sequence[str], name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise InputError(f"`{name}` must be a string or a non-empty list of strings, got {type(prompt).__name__}")


def _matching(prompt: str | Sequence[str], prompts: list[str], name: str) -> list[str]:
    """A string applies to every prompt; a list must give one per prompt."""
    items = _as_prompts(prompt, name)
    if len(items) == 1:
        items = items * len(prompts)
    if len(items) != len(prompts):
        raise InputError(f"{len(items)} {name}s for {len(prompts)} prompts: give one per prompt")
    return items


def _expand(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Tile per-image tensors to the batch (prompts × images per prompt), as diffusers does."""
    if batch % x.shape[0]:
        raise InputError(f"{x.shape[0]} images or masks cannot be spread over {batch} outputs: give one, or one "
                         "per prompt")
    return x.repeat(batch // x.shape[0], 1, 1, 1)
