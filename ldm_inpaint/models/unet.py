"""The conditional UNet that predicts noise in Stable Diffusion 1.x and SDXL, one model for both.

A U-Net (Ronneberger et al. 2015, arXiv:1505.04597) of ResBlocks with timestep conditioning, with spatial
transformers (self-attention, then cross-attention on the text context, then a GEGLU feed-forward; Vaswani et al.
2017, arXiv:1706.03762; Shazeer 2020, arXiv:2002.05202) at the cross-attention levels, as in latent diffusion
(Rombach et al. 2022, arXiv:2112.10752). SDXL (Podell et al. 2023, arXiv:2307.01952) is the same network with other
sizes, linear transformer projections, deeper transformers and an added "micro-conditioning" embedding of the
pooled text vector and six size/crop numbers; all of that is data in `UNetConfig`.

Numerics follow diffusers' `UNet2DConditionModel` (v0.42.1,
https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/unets/unet_2d_condition.py)
so that outputs agree to float rounding for the same weights; `weights_convert/unet.py` maps its keys onto ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm_inpaint.models import attention as attn

TRANSFORMER_NORM_EPS = 1e-6  # the spatial transformer's input GroupNorm; the ResBlocks use `norm_eps`


@dataclass(frozen=True)
class UNetConfig:
    """Sizes of the UNet; the defaults are Stable Diffusion 1.5's. Per-level tuples run from the highest
    resolution (level 0) down; the decoder path visits the levels in reverse."""
    in_channels: int = 4  # 9 for inpainting models: [latent, mask, masked-image latent]
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels per level
    layers_per_block: int = 2  # ResBlocks per level on the way down; one more on the way up
    cross_attention_levels: tuple[bool, ...] = (True, True, True, False)  # a transformer after each ResBlock
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # attention heads per level; the mid block uses the last
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)  # per level; the mid block uses the last
    cross_attention_dim: int = 768  # width of the text context
    use_linear_projection: bool = False  # transformer proj_in/out: linear (SDXL) or 1×1 conv (SD 1.x)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True  # timestep embedding as [cos, sin] rather than [sin, cos]
    freq_shift: float = 0.0
    # SDXL micro-conditioning; None for SD 1.x. Each time id gets a sinusoidal embedding of add_time_embed_dim;
    # add_embed_in_dim = pooled text width + number of time ids × add_time_embed_dim (1280 + 6·256 = 2816).
    add_time_embed_dim: int | None = None
    add_embed_in_dim: int | None = None
    sample_size: int | None = 64  # default latent side; the pipeline's default image side is 8× this

    @classmethod
    def from_diffusers(cls, d: dict) -> UNetConfig:
        """Read a diffusers `unet/config.json` dict; raise ValueError naming any field we don't support."""
        unknown = sorted(k for k in d if not k.startswith("_") and k not in _READ and k not in _FIXED
                         and k not in _IGNORED)
        if unknown:
            raise ValueError(f"UNet config: unknown field(s) {unknown}")
        for key, allowed in _FIXED.items():
            if key in d and (isinstance(d[key], (list, dict)) or d[key] not in allowed):
                raise ValueError(f"UNet config: {key}={d[key]!r} is not supported (supported: {list(allowed)})")

        # Missing fields take the defaults of diffusers' UNet2DConditionModel, as diffusers itself does.
        channels = tuple(d.get("block_out_channels", (320, 640, 1280, 1280)))
        n = len(channels)
        down = list(d.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
        up = list(d.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
        for key, types, known in (("down_block_types", down, _DOWN_BLOCKS), ("up_block_types", up, _UP_BLOCKS)):
            if len(types) != n or any(b not in known for b in types):
                raise ValueError(f"UNet config: {key}={types!r} not supported (need {n} of {list(known)})")
        cross_levels = tuple(_DOWN_BLOCKS[b] for b in down)
        if tuple(_UP_BLOCKS[b] for b in reversed(up)) != cross_levels:
            raise ValueError(f"UNet config: up_block_types {up} must mirror down_block_types {down}")

        def per_level(key: str, default) -> tuple[int, ...]:
            value = d.get(key, default)
            if isinstance(value, int):
                return (value,) * n
            if isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(v, int) for v in value):
                return tuple(value)
            raise ValueError(f"UNet config: {key}={value!r} must be an int or {n} ints (one per level)")

        # diffusers' misnomer: with num_attention_heads unset, attention_head_dim holds the number of heads.
        heads = per_level("attention_head_dim", 8)
        for level, (ch, h, cross) in enumerate(zip(channels, heads, cross_levels)):
            if (cross or level == n - 1) and ch % h:  # the mid block attends with the last level's heads
                raise ValueError(f"UNet config: attention_head_dim (heads) {h} does not divide {ch} channels")

        for key in ("layers_per_block", "cross_attention_dim", "norm_num_groups"):
            if key in d and not isinstance(d[key], int):
                raise ValueError(f"UNet config: {key}={d[key]!r} must be a single int")
        groups = d.get("norm_num_groups", 32)
        if any(ch % groups for ch in channels):  # every ResBlock and transformer GroupNorm splits its level's width
            raise ValueError(f"UNet config: norm_num_groups {groups} does not divide every entry of "
                             f"block_out_channels {list(channels)}")
        sample_size = d.get("sample_size")
        if sample_size is not None and not isinstance(sample_size, int):
            raise ValueError(f"UNet config: sample_size={sample_size!r} must be an int")

        add_time_embed_dim = add_embed_in_dim = None
        if d.get("addition_embed_type") == "text_time":
            add_time_embed_dim = d.get("addition_time_embed_dim")
            add_embed_in_dim = d.get("projection_class_embeddings_input_dim")
            if not isinstance(add_time_embed_dim, int) or not isinstance(add_embed_in_dim, int):
                raise ValueError("UNet config: addition_embed_type 'text_time' needs integer addition_time_embed_dim "
                                 "and projection_class_embeddings_input_dim")

        return cls(
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            block_out_channels=channels,
            layers_per_block=d.get("layers_per_block", 2),
            cross_attention_levels=cross_levels,
            num_heads=heads,
            transformer_layers_per_block=per_level("transformer_layers_per_block", 1),
            cross_attention_dim=d.get("cross_attention_dim", 1280),
            use_linear_projection=bool(d.get("use_linear_projection", False)),
            norm_num_groups=d.get("norm_num_groups", 32),
            norm_eps=d.get("norm_eps", 1e-5),
            flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
            freq_shift=d.get("freq_shift", 0),
            add_time_embed_dim=add_time_embed_dim,
            add_embed_in_dim=add_embed_in_dim,
            sample_size=sample_size,
        )


# Fields of a diffusers UNet config that from_diffusers reads into UNetConfig.
_READ = {"in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
         "up_block_types", "attention_head_dim", "transformer_layers_per_block", "cross_attention_dim",
         "use_linear_projection", "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift",
         "addition_time_embed_dim", "projection_class_embeddings_input_dim", "sample_size"}

# Block types per level → whether the level has cross-attention transformers.
_DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}

# Options we support only at the values that leave the SD 1.x / SDXL architecture unchanged (None = default).
_FIXED = {
    "act_fn": ("silu",), "center_input_sample": (False,), "downsample_padding": (1,),
    "mid_block_scale_factor": (1,), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,), "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,), "upcast_attention": (None, False), "class_embed_type": (None,),
    "num_class_embeds": (None,), "class_embeddings_concat": (False,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "num_attention_heads": (None,), "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1,), "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,), "attention_type": ("default",),
    "cross_attention_norm": (None,), "reverse_transformer_layers_per_block": (None,),
    "addition_embed_type": (None, "text_time"),
}

_IGNORED = {
    "dropout",  # identity at inference
    "addition_embed_type_num_heads",  # used by addition_embed_type "text" only
    # EMA bookkeeping left in some exported configs (SDXL inpainting; diffusers issue #4907)
    "decay", "inv_gamma", "min_decay", "optimization_step", "power", "update_after_step", "use_ema_warmup",
}


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017) of (N,) timesteps → (N, dim), float32."""
    half = dim // 2
    # float32 and this order of operations reproduce diffusers' frequencies bit for bit.
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]  # (N, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)


class TimestepMLP(nn.Module):
    """Two-layer SiLU MLP that turns a sinusoidal (or SDXL added-condition) vector into the block embedding."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResBlock(nn.Module):
    """Two 3×3 convs with GroupNorm and SiLU; the timestep embedding is added as a per-channel bias in between."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Attention(nn.Module):
    """Multi-head attention of x on context (context = x for self-attention); no bias on q, k, v."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.to_out(attn.attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): one projection to value and gate, value · GELU(gate), back to dim."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)
        self.out = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(value * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block on (B, L, C) tokens: self-attention, cross-attention on the text, feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, 4 * dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """Transformer blocks over the H·W positions of a feature map, inside a residual (LDM §3.3)."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int, linear: bool):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, TRANSFORMER_NORM_EPS)
        # SD 1.x checkpoints store the projections as 1×1 convs, SDXL's as linear layers: the same maps.
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        H = x.shape[2]
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = rearrange(h, "b c h w -> b (h w) c")  # the H·W positions as tokens
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = rearrange(h, "b (h w) c -> b c h w", h=H)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class DownBlock(nn.Module):
    """One encoder level: ResBlocks, each followed by a transformer at cross-attention levels, then an optional
    stride-2 3×3 conv that halves the resolution."""

    def __init__(self, resnets: list[ResBlock], attentions: list[SpatialTransformer] | None,
                 downsample: nn.Conv2d | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.downsample = downsample

    def forward(self, h: torch.Tensor, emb: torch.Tensor,
                context: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the level's output and the skips it pushes for the decoder: every ResBlock (or transformer)
        output, then the downsampled output."""
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions is not None:
                h = self.attentions[j](h, context)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)
            skips.append(h)
        return h, skips


class UpBlock(nn.Module):
    """One decoder level: ResBlocks on [features, skip], each followed by a transformer at cross-attention
    levels, then an optional nearest-neighbour ×2 upsampling and 3×3 conv."""

    def __init__(self, resnets: list[ResBlock], attentions: list[SpatialTransformer] | None,
                 upsample: nn.Conv2d | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.upsample = upsample

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, context: torch.Tensor,
                out_size: torch.Size | None = None) -> torch.Tensor:
        """`skips`: one encoder tensor per ResBlock, in the order they are used (the last pushed first);
        `out_size`: the (H, W) to upsample to, needed when the level upsamples."""
        for j, (resnet, skip) in enumerate(zip(self.resnets, skips, strict=True)):
            h = resnet(torch.cat([h, skip], dim=1), emb)
            if self.attentions is not None:
                h = self.attentions[j](h, context)
        if self.upsample is not None:
            h = self.upsample(F.interpolate(h, size=out_size, mode="nearest"))
        return h


class MidBlock(nn.Module):
    """The bottleneck at the lowest resolution: ResBlock, transformer, ResBlock."""

    def __init__(self, resnet_1: ResBlock, attention: SpatialTransformer, resnet_2: ResBlock):
        super().__init__()
        self.resnet_1 = resnet_1
        self.attention = attention
        self.resnet_2 = resnet_2

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.resnet_1(h, emb)
        h = self.attention(h, context)
        return self.resnet_2(h, emb)


class UNet(nn.Module):
    """ε-prediction UNet conditioned on the timestep, a text context and, for SDXL, pooled text + time ids."""

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        # training: recompute each block's activations in the backward pass instead of keeping them
        self.gradient_checkpointing = False
        channels, L = cfg.block_out_channels, cfg.layers_per_block
        emb_dim = 4 * channels[0]

        def resnet(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, cfg.norm_num_groups, cfg.norm_eps)

        def transformer(ch: int, level: int) -> SpatialTransformer:
            return SpatialTransformer(ch, cfg.num_heads[level], cfg.transformer_layers_per_block[level],
                                      cfg.cross_attention_dim, cfg.norm_num_groups, cfg.use_linear_projection)

        self.time_embedding = TimestepMLP(channels[0], emb_dim)
        self.add_embedding = (TimestepMLP(cfg.add_embed_in_dim, emb_dim)
                              if cfg.add_embed_in_dim is not None else None)
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)

        ch = channels[0]
        skip_channels = [ch]  # channels of each tensor the encoder hands to the decoder, in push order
        self.down_blocks = nn.ModuleList()
        for level, out in enumerate(channels):
            resnets = []
            for _ in range(L):
                resnets.append(resnet(ch, out))
                ch = out
                skip_channels.append(ch)
            attentions = [transformer(ch, level) for _ in range(L)] if cfg.cross_attention_levels[level] else None
            downsample = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if level < len(channels) - 1 else None
            if downsample is not None:
                skip_channels.append(ch)
            self.down_blocks.append(DownBlock(resnets, attentions, downsample))

        self.mid_block = MidBlock(resnet(ch, ch), transformer(ch, len(channels) - 1), resnet(ch, ch))

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(channels))):
            out = channels[level]
            resnets = []
            for _ in range(L + 1):
                resnets.append(resnet(ch + skip_channels.pop(), out))
                ch = out
            attentions = [transformer(ch, level) for _ in range(L + 1)] if cfg.cross_attention_levels[level] else None
            upsample = nn.Conv2d(ch, ch, 3, padding=1) if level > 0 else None
            self.up_blocks.append(UpBlock(resnets, attentions, upsample))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, channels[0], cfg.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int, context: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise in x.

        Args:
            x: (B, in_channels, H, W) noisy latents (for inpainting models concatenated with mask and masked latents).
            t: timestep: a number, a 0-dim tensor or a (B,) tensor, integer or float.
            context: (B, L, cross_attention_dim) text encoder hidden states.
            text_embeds: SDXL only, (B, pooled_dim) pooled text embedding.
            time_ids: SDXL only, (B, n) micro-conditioning numbers (original size, crop top-left, target size).
        Returns:
            (B, out_channels, H, W) predicted noise, in x's dtype.
        """
        B = x.shape[0]
        if (self.add_embedding is not None) != (text_embeds is not None and time_ids is not None):
            raise ValueError("text_embeds and time_ids are needed by SDXL-style UNets (added conditioning) "
                             "and by no others")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        cfg = self.cfg
        emb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                                     cfg.freq_shift).to(x.dtype))
        if self.add_embedding is not None:
            # SDXL micro-conditioning (Podell et al. 2023 §2.2): each time id gets its own sinusoidal embedding.
            time_emb = timestep_embedding(time_ids.flatten(), cfg.add_time_embed_dim, cfg.flip_sin_to_cos,
                                          cfg.freq_shift).reshape(B, -1)  # (B, n · add_time_embed_dim)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_emb], dim=-1).to(emb.dtype))

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, pushed = self._run(block, h, emb, context)
            skips += pushed

        h = self._run(self.mid_block, h, emb, context)

        for block in self.up_blocks:
            popped = [skips.pop() for _ in block.resnets]
            # Upsampling to the next skip's size (2× unless a side was odd on the way down) lets latent
            # sizes that are not multiples of 2^levels through, as diffusers does.
            out_size = skips[-1].shape[-2:] if skips else None
            h = self._run(block, h, popped, emb, context, out_size)

        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)
