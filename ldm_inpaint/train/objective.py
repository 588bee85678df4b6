"""The denoising objective (Ho et al. 2020; Rombach et al. 2022 for latents and the 9-channel inpainting input):
noise a clean latent to a random timestep and ask the UNet for ε (or v, Salimans & Ho 2022) back.

Every random number of a sample comes from its own generator, seeded by (seed, step, sample's place in the
global batch), so a run resumed at step k, or split over several processes, draws exactly what one
uninterrupted process would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..schedulers.schedule import SchedulerConfig, alphas_cumprod


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator of sample `index` of the global batch of optimizer step `step`."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 100_003 + index)


class Objective:
    """Timesteps, noise, targets and loss weights of the scheduler config the model was trained with."""

    def __init__(self, scheduler_config: dict, snr_gamma: float | None = None, noise_offset: float = 0.0):
        cfg = SchedulerConfig.from_diffusers(scheduler_config)
        self.prediction_type = cfg.prediction_type  # "epsilon" or "v_prediction"
        self.alpha_bar = alphas_cumprod(cfg)  # (T,)
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alpha_bar)

    def draw(self, latent_shape: tuple[int, ...], generators: list[torch.Generator]):
        """Per sample: a timestep, the noise (B, C, h, w) and, with noise_offset, a per-channel constant added to
        it (Guttenberg 2023: lets the model learn very dark and very bright pictures)."""
        t = torch.cat([torch.randint(0, self.num_train_timesteps, (1,), generator=g) for g in generators])
        noise = torch.cat([torch.randn((1, *latent_shape), generator=g) for g in generators])
        if self.noise_offset:
            offset = torch.cat([torch.randn((1, latent_shape[0], 1, 1), generator=g) for g in generators])
            noise = noise + self.noise_offset * offset
        return t, noise

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε, per sample."""
        a = self.alpha_bar.to(x0.device)[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        a = self.alpha_bar.to(x0.device)[t].view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * x0  # v = √ᾱ·ε − √(1 − ᾱ)·x_0

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean squared error, in fp32, per sample weighted by min-SNR-γ (Hang et al. 2023) when snr_gamma is
        set: min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v, so easy low-noise steps stop dominating."""
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.snr_gamma is not None:
            a = self.alpha_bar.to(t.device)[t]
            snr = a / (1 - a)
            weight = snr.clamp(max=self.snr_gamma) / (snr if self.prediction_type == "epsilon" else snr + 1)
            per_sample = per_sample * weight
        return per_sample.mean()


def inpainting_input(noisy: torch.Tensor, mask_px: torch.Tensor, masked_latents: torch.Tensor) -> torch.Tensor:
    """The 9-channel UNet's input (B, 9, h, w): [x_t, mask at latent size, latents of the masked picture], the
    mask resized as the pipeline resizes it (nearest)."""
    mask = F.interpolate(mask_px, size=noisy.shape[-2:])
    return torch.cat([noisy, mask.to(noisy.dtype), masked_latents.to(noisy.dtype)], dim=1)
