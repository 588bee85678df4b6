"""The denoising loop as a generator, knowing nothing of prompts or pixels: start latents, a `Conditioning`
record, a scheduler and a UNet go in; one `Step` per model call comes out.

    for step in sample(unet, latents, cond, scheduler, generator):
        step.i, step.t, step.latents, step.x0     # assign step.latents to steer the rest of the run

Guidance (Ho & Salimans 2022, with the rescale of Lin et al. 2023) is `guide(model_output, cond)`, and the
known-region blend of 4-channel inpainting is `blend_known(latents, cond, scheduler, i)`: a new guidance term
or blend is a change in one of these two functions, not in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .noise import Generator


@dataclass
class Conditioning:
    """What the UNet sees besides the noisy latents, for the whole UNet batch N (2B with guidance: the B
    unconditional rows first, as diffusers orders them), and how its output is turned into one prediction."""
    context: torch.Tensor  # (N, 77, D) text hidden states
    pooled: torch.Tensor | None = None  # SDXL (N, P): encoder 2's projected EOS token
    time_ids: torch.Tensor | None = None  # SDXL (N, 6): original size, crop top-left, target size
    mask: torch.Tensor | None = None  # inpainting (N, 1, h, w) on the latent grid: 1 = repaint
    masked_latents: torch.Tensor | None = None  # 9-channel UNets (N, 4, h, w): the masked image's latents
    guidance_scale: float = 1.0  # classifier-free guidance is on above 1
    guidance_rescale: float = 0.0  # φ of Lin et al. 2023 §3.4
    # known-region blend: after each step the latents outside the mask become the image's latents noised to
    # the next step's level (4-channel inpainting; 9-channel with masked_latents_blend)
    known: torch.Tensor | None = None  # (B, 4, h, w) image latents
    noise: torch.Tensor | None = None  # (B, 4, h, w) the noise `known` is noised with: the start noise

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) → the UNet's input (N, 4 or 9, h, w)."""
        if self.guided:
            x = torch.cat([x, x])
        if self.masked_latents is not None:  # mask and masked latents are never scaled by the scheduler
            x = torch.cat([x, self.mask, self.masked_latents], dim=1)
        return x

    def unet_kwargs(self) -> dict:
        return {} if self.pooled is None else dict(text_embeds=self.pooled, time_ids=self.time_ids)


@dataclass
class Step:
    """One model call of the loop. `latents` are the latents after the step (and the blend); the caller may
    replace them, and the loop continues from what it finds there."""
    i: int  # index of the model call (Heun makes two per step)
    t: torch.Tensor  # the timestep the UNet saw
    latents: torch.Tensor  # (B, 4, h, w)
    x0: torch.Tensor  # (B, 4, h, w): the guided prediction of the clean latents at this step
    model_output: torch.Tensor  # (N, 4, h, w): the UNet's raw output, both halves when guided


def guide(model_output: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The UNet's (N, …) output → one (B, …) prediction: ε_u + s·(ε_c − ε_u), then the rescale."""
    if not cond.guided:
        return model_output
    uncond, text = model_output.chunk(2)
    out = uncond + cond.guidance_scale * (text - uncond)
    if cond.guidance_rescale > 0:
        out = rescale_guidance(out, text, cond.guidance_rescale)
    return out


def rescale_guidance(eps: torch.Tensor, eps_text: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023 eq. 15–16: match the guided prediction's std to the text prediction's, then blend by φ
    (against over-exposure with zero-terminal-SNR schedules and high guidance)."""
    dims = list(range(1, eps.ndim))
    rescaled = eps * (eps_text.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * eps


def blend_known(latents: torch.Tensor, cond: Conditioning, scheduler, i: int) -> torch.Tensor:
    """Re-impose the known region after step i: the image latents noised to the next step's level (the clean
    ones after the last step) outside the mask, the sampled latents inside."""
    if cond.known is None:
        return latents
    last = i + 1 == len(scheduler.timesteps)
    known = cond.known if last else scheduler.add_noise(cond.known, cond.noise, i + 1)
    mask = cond.mask[: latents.shape[0]]  # both halves of a guided mask are the same
    return (1 - mask) * known + mask * latents


def sample(unet, latents: torch.Tensor, cond: Conditioning, scheduler, generator: Generator = None,
           progress: bool = False, desc: str = "sampling") -> Iterator[Step]:
    """Denoise `latents` (B, 4, h, w) along `scheduler.timesteps`, yielding after every model call."""
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc=desc)):
        model_output = unet(cond.model_input(scheduler.scale_model_input(latents, i)), t, cond.context,
                            **cond.unet_kwargs())
        prediction = guide(model_output, cond)
        x0 = scheduler.predicted_x0(prediction, i, latents)
        latents = scheduler.step(prediction, i, latents, generator=generator)
        if not torch.isfinite(latents).all():  # else the run goes on and decodes a black picture
            raise FloatingPointError(
                f"step {i + 1} of {len(scheduler.timesteps)} (t={int(t)}) gave NaN or infinite latents: the weights "
                "may hold NaN/inf values (check the checkpoint), or fp16 overflowed (use bf16 or fp32)")
        step = Step(i, t, blend_known(latents, cond, scheduler, i), x0, model_output)
        yield step
        latents = step.latents
