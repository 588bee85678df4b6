"""The KL-regularised autoencoder of latent diffusion (SD 1.5 and SDXL VAEs; only the config differs).

The encoder maps an image in [-1, 1] to the mean and log-variance of a diagonal Gaussian posterior
q(z|x) over latents 8× smaller per side (one ×2 downsample per level but the last); the decoder maps a
latent back to an image. Diffusion runs on `scaling_factor · z`, so the caller multiplies after sampling
and divides before decoding.

References:
- D. P. Kingma, M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014 (the Gaussian posterior and its
  reparameterised sample).
- R. Rombach, A. Blattmann, D. Lorenz, P. Esser, B. Ommer, "High-Resolution Image Synthesis with Latent
  Diffusion Models", CVPR 2022 (the architecture, §3 and App. G; the latent scaling, §4.3.2 and App. D.1).
- Numerics follow diffusers v0.42.1 `AutoencoderKL`:
  https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl.py
  https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/vae.py
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm_inpaint.models import attention as attn
from ldm_inpaint.noise import Generator, randn

SD15_SCALING_FACTOR = 0.18215  # makes SD 1.5 latents roughly unit variance (Rombach et al. §4.3.2)
NORM_EPS = 1e-6  # every VAE GroupNorm, as in the released checkpoints
LOGVAR_RANGE = (-30.0, 20.0)  # clamp keeps exp(logvar) finite in fp16 and fp32 alike


@dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of `AutoencoderKL`; the defaults are the SD 1.5 VAE."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 512
    scaling_factor: float = SD15_SCALING_FACTOR
    force_upcast: bool = True  # the pipeline runs this VAE in fp32 even when the UNet runs in fp16
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        if not self.block_out_channels:
            raise ValueError("block_out_channels: needs at least one level")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"norm_num_groups: {self.norm_num_groups} does not divide every entry of "
                             f"block_out_channels {self.block_out_channels}")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block: must be >= 1, got {self.layers_per_block}")

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> VAEConfig:
        """The config of a diffusers `AutoencoderKL` `config.json`. A missing key takes diffusers' class
        default (official SD 1.5 configs omit `scaling_factor` and `force_upcast`), exactly as diffusers
        would build the model; keys starting with `_` are metadata. Raises ValueError naming the field
        for a value this implementation does not support, or for a key it does not know."""
        known = {"in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                 "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
                 "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
                 "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown AutoencoderKL config field (all unknown: {unknown})")

        # diffusers' AutoencoderKL.__init__ defaults; note they are not the SD 1.5 values of this dataclass.
        block_out_channels = tuple(d.get("block_out_channels", (64,)))
        down_block_types = tuple(d.get("down_block_types", ("DownEncoderBlock2D",)))
        up_block_types = tuple(d.get("up_block_types", ("UpDecoderBlock2D",)))
        for field, types, supported in (("down_block_types", down_block_types, "DownEncoderBlock2D"),
                                        ("up_block_types", up_block_types, "UpDecoderBlock2D")):
            if any(t != supported for t in types):
                raise ValueError(f"{field}: only {supported} is supported, got {list(types)}")
            # diffusers pairs block i with block_out_channels[i] and counts levels by block_out_channels
            if len(types) != len(block_out_channels):
                raise ValueError(f"{field}: {len(types)} entries for {len(block_out_channels)} "
                                 f"block_out_channels")
        if d.get("act_fn", "silu") != "silu":
            raise ValueError(f"act_fn: only 'silu' is supported, got {d['act_fn']!r}")
        for field in ("shift_factor", "latents_mean", "latents_std"):
            if d.get(field) is not None:
                raise ValueError(f"{field}: latent shift/normalisation is not supported, got {d[field]!r}")
        sample_size = d.get("sample_size", 32)
        return cls(
            in_channels=d.get("in_channels", 3),
            out_channels=d.get("out_channels", 3),
            block_out_channels=block_out_channels,
            layers_per_block=d.get("layers_per_block", 1),
            latent_channels=d.get("latent_channels", 4),
            norm_num_groups=d.get("norm_num_groups", 32),
            sample_size=tuple(sample_size) if isinstance(sample_size, (list, tuple)) else sample_size,
            scaling_factor=d.get("scaling_factor", SD15_SCALING_FACTOR),
            force_upcast=d.get("force_upcast", True),
            use_quant_conv=d.get("use_quant_conv", True),
            use_post_quant_conv=d.get("use_post_quant_conv", True),
            mid_block_add_attention=d.get("mid_block_add_attention", True),
        )


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice, plus a (1×1-projected when the width changes) skip.
    Port of diffusers `ResnetBlock2D` without the time embedding, which the VAE does not use."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.conv_shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H·W positions, with a residual. Port of the diffusers
    `Attention` the VAE mid block builds (heads = 1, group_norm, residual_connection, no rescale)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # diffusers' view/transpose pair, not einops (at B = 1 the strides differ and pick other kernels), and
        # the norm on the (B, C, H·W) view as diffusers: on a channels-last 4-D map (the preprocessed image is
        # one) PyTorch's channels-last GroupNorm kernel sums in another order (encodings off by ~5e-7)
        h = self.group_norm(x.view(B, C, H * W)).transpose(1, 2)  # (B, L, C)
        h = attn.attention(self.to_q(h), self.to_k(h), self.to_v(h), heads=1)
        h = self.to_out(h).transpose(1, 2).reshape(B, C, H, W)  # a view: channels-last strides
        # The sum takes the layout of its first operand, so `h + x` stays channels-last, and every conv after
        # this block then runs channels-last, as in diffusers; `x + h` would pick other conv kernels and
        # change the result in the last bits (~1e-6 on tiny models).
        return h + x


class MidBlock(nn.Module):
    """ResNet → attention → ResNet at the lowest resolution (attention optional by config)."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnet1 = ResnetBlock(channels, channels, groups)
        self.attn = AttentionBlock(channels, groups) if add_attention else nn.Identity()
        self.resnet2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnet2(self.attn(self.resnet1(x)))


class Downsample(nn.Module):
    """Stride-2 3×3 conv. The padding is (0, 1, 0, 1), right and bottom only, as the checkpoints were
    trained with (diffusers `Downsample2D` with padding=0); symmetric padding would move every tap one pixel."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then a 3×3 conv (diffusers `Upsample2D`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResNets, then a resampler (nn.Identity on the level that has none)."""

    def __init__(self, in_channels: int, out_channels: int, num_resnets: int, groups: int, resample: nn.Module):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_channels if j == 0 else out_channels, out_channels, groups)
                                     for j in range(num_resnets))
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.resample(x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) → posterior moments (B, 2·latent_channels, H/f, W/f), f = 2^(levels−1).
    Port of diffusers `Encoder`."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, groups, n = cfg.block_out_channels, cfg.norm_num_groups, cfg.layers_per_block
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(widths[max(i - 1, 0)], w, n, groups, Downsample(w) if i < len(widths) - 1 else nn.Identity())
            for i, w in enumerate(widths))
        self.mid = MidBlock(widths[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) → image (B, out_channels, h·f, w·f). The levels run from the widest
    (lowest resolution) up; each has one ResNet more than an encoder level. Port of diffusers `Decoder`."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, groups, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.layers_per_block
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid = MidBlock(widths[0], groups, cfg.mid_block_add_attention)
        self.up = nn.ModuleList(
            Level(widths[max(i - 1, 0)], w, n + 1, groups, Upsample(w) if i < len(widths) - 1 else nn.Identity())
            for i, w in enumerate(widths))
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.up:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))), logvar clamped to `LOGVAR_RANGE`."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(*LOGVAR_RANGE)

    def sample(self, generator: Generator = None) -> torch.Tensor:
        """mean + std·ε (the reparameterisation of Kingma & Welling §2.4), with ε drawn as diffusers'
        `randn_tensor` draws it so a seed gives the same latent: in the mean's dtype, on the generator's
        device (then moved), and with a list of generators one (1, …) draw per batch item."""
        eps = randn(self.mean.shape, generator, self.mean.device, self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * eps

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """The KL autoencoder of Rombach et al. 2022 (diffusers `AutoencoderKL`, without tiling or slicing).

    `encode(x)` takes images in [-1, 1] and returns the posterior; `decode(z)` takes latents already divided
    by `cfg.scaling_factor` and returns images in about [-1, 1].
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # 1×1 convs between the autoencoder and the latent space, kept by SD checkpoints from the VQ-GAN lineage
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else nn.Identity()

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image (B, in_channels, H, W) in [-1, 1] → posterior over (B, latent_channels, H/f, W/f)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, latent_channels, h, w), unscaled → image (B, out_channels, h·f, w·f)."""
        return self.decoder(self.post_quant_conv(z))
