"""The sampling loop of latent diffusion: text-to-image, img2img and inpainting with one pipeline.

Follows Rombach et al. 2022 (latent diffusion, the 9-channel inpainting UNet) and Ho & Salimans 2022
(classifier-free guidance). Every convention that decides the output — the order in which random numbers are
drawn, the mask and image preprocessing, which timesteps `strength` skips — is diffusers', so the same seed
gives the same image (see docs/architecture.md and docs/parity.md).

Which task runs is decided by the inputs and the UNet:
    no image                        → text-to-image
    image, no mask                  → img2img
    image + mask, 9-channel UNet    → inpainting, the UNet sees [latent, mask, masked-image latent]
    image + mask, 4-channel UNet    → inpainting by re-imposing the noised known region after every step

Options that keep the input picture (mask edits, "only masked" crops, paste-back) live in inpaint.py; they
run before stage 1 and after the decode, so the sampling loop itself is unchanged by them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from weights_convert.common import release

from . import schedulers
from .image import ImageInput, image_size, postprocess, preprocess_image, preprocess_mask, round_size
from .inpaint import PasteBack, blur_masks, edit_masks
from .models.clip import CLIPTextModel
from .models.unet import UNet
from .models.vae import AutoencoderKL
from .noise import Generator, randn
from .tokenizer import tokenize


@dataclass
class PipelineOutput:
    images: object  # list of PIL images, a float array (B, H, W, 3) in [0, 1], or latents (B, 4, H/8, W/8)


def _as_prompts(prompt: str | Sequence[str], name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"`{name}` must be a string or a non-empty list of strings, got {type(prompt).__name__}")


class Pipeline:
    """Text encoder(s) + UNet + VAE + scheduler config; called like diffusers' Stable Diffusion pipelines.

    SD 1.x has one CLIP ViT-L/14 text encoder; SDXL adds OpenCLIP ViT-bigG (`text_encoder_2`), whose pooled
    output and six size/crop "time ids" condition the UNet beside the text context."""

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer,
                 scheduler_config: dict, text_encoder_2: CLIPTextModel | None = None, tokenizer_2=None,
                 force_zeros_for_empty_prompt: bool = False, name: str = ""):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.scheduler_config = scheduler_config
        # SDXL: no negative prompt means zero embeddings, not the encoding of ""
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.name = name
        # Each model's memory-mapped weights go back to the page cache when its stage of a call is over, so
        # the peak is that of the largest model, not of all of them; the next call maps them in again.
        self.release_weights = True

    def _release(self, *models: torch.nn.Module | None) -> None:
        if self.release_weights:
            for model in models:
                if model is not None:
                    release(model)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_dtype(self) -> torch.dtype:  # fp32 when an SDXL VAE's config forces it (see loading.py)
        return next(self.vae.parameters()).dtype

    # -- 1. text ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], prompts_2: list[str] | None = None,
                      clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts → (context (B, 77, D), pooled (B, P) or None), as diffusers conditions each family.

        SD 1.x: the last layer after the final layer norm, or with clip_skip=k the output k layers earlier,
        also through the final layer norm. SDXL: the penultimate layer of both encoders without the final norm
        (k layers earlier with clip_skip), concatenated to 768 + 1280 wide; pooled = encoder 2's projected EOS."""
        if not self.is_sdxl:
            layer = -1 if clip_skip is None else -(clip_skip + 1)
            ids = tokenize(self.tokenizer, prompts).to(_device_of(self.text_encoder))
            return self.text_encoder(ids, hidden_layer=layer).hidden.to(self.dtype), None
        layer = -2 if clip_skip is None else -(clip_skip + 2)
        ids = tokenize(self.tokenizer, prompts).to(_device_of(self.text_encoder))
        ids_2 = tokenize(self.tokenizer_2, prompts_2 or prompts).to(_device_of(self.text_encoder_2))
        hidden = self.text_encoder(ids, hidden_layer=layer, final_norm=False).hidden
        out_2 = self.text_encoder_2(ids_2, hidden_layer=layer, final_norm=False, pooled=True)
        context = torch.cat([hidden.to(out_2.hidden.device), out_2.hidden], dim=-1)
        return context.to(self.device, self.dtype), out_2.pooled.to(self.device, self.dtype)

    # -- 2. images ----------------------------------------------------------------------------------------
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

    # -- the call -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        strength: float | None = None,
        generator: Generator = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | Callable | None = None,
        eta: float | None = None,
        clip_skip: int | None = None,
        guidance_rescale: float = 0.0,
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        preserve_unmasked: bool = False,
        mask_blur: float = 0,
        mask_grow: int = 0,
        invert_mask: bool = False,
        padding_mask_crop: int | None = None,
        masked_latents_blend: bool = False,
        output_type: str = "pil",
        progress: bool = True,
        **scheduler_overrides,
    ) -> PipelineOutput:
        """Generate images. Arguments are named, and default, as in diffusers' Stable Diffusion pipelines.

        Args:
            prompt: a string or one string per batch item.
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
            output_type: "pil", "np" (float array (B, H, W, 3) in [0, 1]) or "latent".
            progress: show a progress bar.
        """
        task = "txt2img" if image is None else ("img2img" if mask_image is None else "inpaint")
        inpainting_unet = self.unet.cfg.in_channels == 9
        if guidance_scale is None:
            guidance_scale = 5.0 if self.is_sdxl and task != "inpaint" else 7.5
        if strength is None:
            strength = {"txt2img": 1.0, "img2img": 0.3 if self.is_sdxl else 0.8,
                        "inpaint": 0.9999 if self.is_sdxl else 1.0}[task]
        self._check(task, image, mask_image, num_inference_steps, guidance_scale, strength, num_images_per_prompt,
                    output_type)
        if not self.is_sdxl and (prompt_2 is not None or negative_prompt_2 is not None):
            raise ValueError("prompt_2 and negative_prompt_2 need an SDXL model (it has a second text encoder)")
        prompts = _as_prompts(prompt, "prompt")
        batch = len(prompts) * num_images_per_prompt
        if isinstance(generator, (list, tuple)) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} images: give one per image or a single one")
        self._check_picture_options(task, output_type, preserve_unmasked, mask_blur, mask_grow, invert_mask,
                                    padding_mask_crop, masked_latents_blend)
        if height is None or width is None:  # the crop is resized to the model's size, as diffusers does
            h0, w0 = (image_size(image) if image is not None and padding_mask_crop is None
                      else (self.unet.cfg.sample_size * 8,) * 2)
            height, width = height or h0, width or w0
        height, width = round_size(height, width)
        device, dtype = self.device, self.dtype
        guided = guidance_scale > 1.0

        # 0. the mask as edited (invert, grow, then blur), and how the result goes back into the input picture;
        #    padding_mask_crop: from here on, image and mask are the box around the mask, at height × width
        paste = None
        if task == "inpaint":
            mask_image = edit_masks(mask_image, invert_mask, mask_grow)
            if preserve_unmasked or padding_mask_crop is not None:
                paste = PasteBack.build(image, mask_image, preserve_unmasked, mask_blur)
            mask_image = blur_masks(mask_image, mask_blur)
            if padding_mask_crop is not None:
                image, mask_image = paste.crop(image, mask_image, width, height, padding_mask_crop)

        # 1. text: context (B, 77, D) [+ SDXL pooled (B, P) and time ids (B, 6)], unconditional half first
        prompts_2 = None if prompt_2 is None else _matching(prompt_2, prompts, "prompt_2")
        context, pooled = self.encode_prompt(prompts, prompts_2, clip_skip)
        if guided:
            if self.is_sdxl and negative_prompt is None and self.force_zeros_for_empty_prompt:
                uncond, uncond_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
            else:
                negatives = _matching("" if negative_prompt is None else negative_prompt, prompts, "negative_prompt")
                negatives_2 = negatives if negative_prompt_2 is None else _matching(
                    negative_prompt_2, prompts, "negative_prompt_2")
                uncond, uncond_pooled = self.encode_prompt(negatives, negatives_2)
            context = torch.cat([uncond, context])
            pooled = None if pooled is None else torch.cat([uncond_pooled, pooled])
        self._release(self.text_encoder, self.text_encoder_2)
        context = context.repeat_interleave(num_images_per_prompt, dim=0)  # each row n times, halves kept
        pooled = None if pooled is None else pooled.repeat_interleave(num_images_per_prompt, dim=0)
        added = {}
        if self.is_sdxl:
            time_ids = _time_ids(task, (height, width), original_size, crops_coords_top_left, target_size,
                                 negative_original_size, negative_crops_coords_top_left, negative_target_size)
            time_ids = torch.tensor(time_ids if guided else time_ids[1:], dtype=dtype, device=device)
            added = dict(text_embeds=pooled, time_ids=time_ids.repeat_interleave(batch, dim=0))

        # 2. schedule (cut by strength)
        if scheduler is None:
            scheduler = schedulers.from_checkpoint(self.scheduler_config)
        if eta is not None:
            scheduler_overrides["eta"] = eta
        sched = schedulers.create(scheduler, self.scheduler_config, num_inference_steps, strength,
                                  **scheduler_overrides)
        timesteps = sched.timesteps

        # 3. images, masks and the start latent, drawing random numbers in diffusers' order
        shape = (batch, 4, height // 8, width // 8)
        image_latents = mask = masked_latents = None
        if task == "img2img":
            x = preprocess_image(image, height, width)
            if isinstance(generator, (list, tuple)):  # diffusers repeats the images first, then encodes each
                x = x.repeat(batch // x.shape[0], 1, 1, 1)
            image_latents = _expand(self.encode_image(x, generator), batch)
            noise = randn(shape, generator, device, dtype)
            latents = sched.add_noise(image_latents, noise, 0)
        else:
            if task == "inpaint":
                x = preprocess_image(image, height, width)
                mask_px = preprocess_mask(mask_image, height, width)
                if not inpainting_unet or strength < 1.0:
                    image_latents = _expand(self.encode_image(x, generator), batch)
            noise = randn(shape, generator, device, dtype)
            latents = noise * sched.init_noise_sigma if strength == 1.0 else sched.add_noise(image_latents, noise, 0)
            if task == "inpaint":
                masked = x * (mask_px < 0.5)  # repainted pixels become 0, mid-grey
                masked_latents = _expand(self.encode_image(masked, generator), batch)
                mask = _expand(torch.nn.functional.interpolate(mask_px, size=shape[-2:]), batch).to(device, dtype)
                if masked_latents_blend and image_latents is None:  # the mean: no random number drawn
                    image_latents = _expand(self.encode_image(x, generator, sample=False), batch)
        blend = task == "inpaint" and (not inpainting_unet or masked_latents_blend)
        self._release(self.vae.encoder)

        # 4. denoise
        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc=self.name or "sampling")):
            x_in = torch.cat([latents] * 2) if guided else latents
            x_in = sched.scale_model_input(x_in, i)
            if inpainting_unet:  # mask and masked latents are never scaled by the scheduler
                extra = torch.cat([mask, masked_latents], dim=1)
                x_in = torch.cat([x_in, torch.cat([extra] * 2) if guided else extra], dim=1)
            eps = self.unet(x_in, t, context, **added)
            if guided:
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
                if guidance_rescale > 0:
                    eps = rescale_guidance(eps, eps_text, guidance_rescale)
            latents = sched.step(eps, i, latents, generator=generator)
            if blend:
                known = sched.add_noise(image_latents, noise, i + 1) if i + 1 < len(timesteps) else image_latents
                latents = (1 - mask) * known + mask * latents
        self._release(self.unet)

        # 5. decode
        if output_type == "latent":
            return PipelineOutput(images=latents)
        decoded = self.decode(latents)
        self._release(self.vae.decoder)
        if paste is None:
            return PipelineOutput(images=postprocess(decoded, output_type))

        # 6. paste back into the input picture, at its own size
        images = paste(postprocess(decoded, "pil"))
        if output_type == "np":
            images = np.stack([np.asarray(i, dtype=np.float32) / 255 for i in images])
        return PipelineOutput(images=images)

    def _check(self, task, image, mask_image, num_inference_steps, guidance_scale, strength, num_images_per_prompt,
               output_type) -> None:
        if mask_image is not None and image is None:
            raise ValueError("mask_image was given without image: pass the image to inpaint as well")
        if task == "inpaint" and image_size(image) != image_size(mask_image):
            (h, w), (mh, mw) = image_size(image), image_size(mask_image)
            raise ValueError(f"image is {w}x{h} but mask_image is {mw}x{mh}: give a mask of the image's size")
        if self.unet.cfg.in_channels == 9 and task != "inpaint":
            raise ValueError(f"{self.name or 'this'} is an inpainting model (9-channel UNet): give both "
                             "image and mask_image")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if task == "txt2img" and strength != 1.0:
            raise ValueError("strength applies only when an image is given")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer ≥ 1, got {num_inference_steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be ≥ 0 (1 or less turns guidance off), got {guidance_scale}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be ≥ 1, got {num_images_per_prompt}")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")

    def _check_picture_options(self, task, output_type, preserve_unmasked, mask_blur, mask_grow, invert_mask,
                               padding_mask_crop, masked_latents_blend) -> None:
        used = [name for name, v in [("preserve_unmasked", preserve_unmasked), ("mask_blur", mask_blur),
                                     ("mask_grow", mask_grow), ("invert_mask", invert_mask),
                                     ("padding_mask_crop", padding_mask_crop is not None),
                                     ("masked_latents_blend", masked_latents_blend)] if v]
        if used and task != "inpaint":
            raise ValueError(f"{', '.join(used)} need(s) an image and a mask_image (inpainting)")
        if (preserve_unmasked or padding_mask_crop is not None) and output_type == "latent":
            raise ValueError("preserve_unmasked and padding_mask_crop paste pixels back: use output_type "
                             "'pil' or 'np', not 'latent'")
        if not isinstance(mask_blur, (int, float)) or mask_blur < 0:
            raise ValueError(f"mask_blur must be a number ≥ 0 (px), got {mask_blur!r}")


def rescale_guidance(eps: torch.Tensor, eps_text: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023 eq. 15–16: match the guided prediction's std to the text prediction's, then blend by φ
    (against over-exposure with zero-terminal-SNR schedules and high guidance)."""
    dims = list(range(1, eps.ndim))
    rescaled = eps * (eps_text.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * eps


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


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _matching(prompt: str | Sequence[str], prompts: list[str], name: str) -> list[str]:
    """A string applies to every prompt; a list must give one per prompt."""
    items = _as_prompts(prompt, name)
    if len(items) == 1:
        items = items * len(prompts)
    if len(items) != len(prompts):
        raise ValueError(f"{len(items)} {name}s for {len(prompts)} prompts: give one per prompt")
    return items


def _expand(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Tile per-image tensors to the batch (prompts × images per prompt), as diffusers does."""
    if batch % x.shape[0]:
        raise ValueError(f"{x.shape[0]} images or masks cannot be spread over {batch} outputs: give one, or one "
                         "per prompt")
    return x.repeat(batch // x.shape[0], 1, 1, 1)
