"""Key tables for the KL autoencoder (`ldm_inpaint.models.vae.AutoencoderKL`).

`diffusers_keys(cfg)` maps every native parameter to its name in a diffusers `vae/` folder. Tables are built
from the config with loops over levels and layers, one exact key per parameter. Leaf names inside a block
(`RESNET_LEAVES`, `DIFFUSERS_ATTENTION_LEAVES`) are tables of their own so that another layout only needs its
own prefixes and leaf names. Older diffusers files use other names for the mid-block attention; they are
renamed first (`rename_legacy_attention`), so one table serves both:

    tensors = rename_legacy_attention(read_tensors(path))
    with torch.device("meta"):
        vae = AutoencoderKL(cfg)
    load_into(vae, tensors, diffusers_keys(cfg), what="VAE")
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from ldm_inpaint.models.vae import VAEConfig
from weights_convert.common import CheckpointError

# native leaf → checkpoint leaf, inside one block; every VAE leaf has a weight and a bias
RESNET_LEAVES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                 "conv_shortcut": "conv_shortcut"}
DIFFUSERS_ATTENTION_LEAVES = {"group_norm": "group_norm", "to_q": "to_q", "to_k": "to_k", "to_v": "to_v",
                              "to_out": "to_out.0"}

# diffusers < 0.14 saved the mid-block attention (then `AttentionBlock`) as query/key/value/proj_attn;
# diffusers itself still renames these on load. `group_norm` kept its name.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTENTION_KEY = re.compile(
    r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def rename_legacy_attention(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint with legacy mid-block attention keys (`LEGACY_ATTENTION_NAMES`) given their current
    diffusers names; other keys pass through. A file holding both spellings of one key is refused."""
    out = {}
    for key, tensor in tensors.items():
        m = _LEGACY_ATTENTION_KEY.match(key)
        new = f"{m[1]}.{LEGACY_ATTENTION_NAMES[m[2]]}.{m[3]}" if m else key
        if m and new in tensors:
            raise CheckpointError(f"VAE checkpoint holds {new} twice (legacy and current attention names)")
        out[new] = tensor
    return out


def _add(table: dict[str, str], native: str, ckpt: str, leaves: Mapping[str, str]) -> None:
    """Weight and bias of each leaf, under the prefixes `native` and `ckpt` ("" for the top level)."""
    join = lambda prefix, leaf: f"{prefix}.{leaf}" if prefix else leaf  # noqa: E731
    for ours, theirs in leaves.items():
        for p in ("weight", "bias"):
            table[join(native, f"{ours}.{p}")] = join(ckpt, f"{theirs}.{p}")


def _resnet(table: dict[str, str], native: str, ckpt: str, c_in: int, c_out: int) -> None:
    leaves = RESNET_LEAVES if c_in != c_out else {k: v for k, v in RESNET_LEAVES.items() if k != "conv_shortcut"}
    _add(table, native, ckpt, leaves)


def diffusers_keys(cfg: VAEConfig) -> dict[str, str]:
    """{native key: diffusers key} for every parameter of `AutoencoderKL(cfg)`."""
    table: dict[str, str] = {}
    widths, n, last = cfg.block_out_channels, cfg.layers_per_block, len(cfg.block_out_channels) - 1

    def mid(part: str, width: int) -> None:
        _resnet(table, f"{part}.mid.resnet1", f"{part}.mid_block.resnets.0", width, width)
        if cfg.mid_block_add_attention:
            _add(table, f"{part}.mid.attn", f"{part}.mid_block.attentions.0", DIFFUSERS_ATTENTION_LEAVES)
        _resnet(table, f"{part}.mid.resnet2", f"{part}.mid_block.resnets.1", width, width)

    _add(table, "encoder", "encoder", {"conv_in": "conv_in"})
    for i, w in enumerate(widths):
        for j in range(n):
            c_in = widths[max(i - 1, 0)] if j == 0 else w
            _resnet(table, f"encoder.down.{i}.resnets.{j}", f"encoder.down_blocks.{i}.resnets.{j}", c_in, w)
        if i < last:
            _add(table, f"encoder.down.{i}.resample", f"encoder.down_blocks.{i}.downsamplers.0", {"conv": "conv"})
    mid("encoder", widths[-1])
    _add(table, "encoder", "encoder", {"conv_norm_out": "conv_norm_out", "conv_out": "conv_out"})

    if cfg.use_quant_conv:
        _add(table, "", "", {"quant_conv": "quant_conv"})
    if cfg.use_post_quant_conv:
        _add(table, "", "", {"post_quant_conv": "post_quant_conv"})

    rwidths = widths[::-1]
    _add(table, "decoder", "decoder", {"conv_in": "conv_in"})
    mid("decoder", rwidths[0])
    for i, w in enumerate(rwidths):
        for j in range(n + 1):
            c_in = rwidths[max(i - 1, 0)] if j == 0 else w
            _resnet(table, f"decoder.up.{i}.resnets.{j}", f"decoder.up_blocks.{i}.resnets.{j}", c_in, w)
        if i < last:
            _add(table, f"decoder.up.{i}.resample", f"decoder.up_blocks.{i}.upsamplers.0", {"conv": "conv"})
    _add(table, "decoder", "decoder", {"conv_norm_out": "conv_norm_out", "conv_out": "conv_out"})
    return table


# --- CompVis `ldm` single-file layout (`first_stage_model.`; SD 1.x and SDXL alike) ---
LDM_PREFIX = "first_stage_model."
LDM_RESNET_LEAVES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                     "conv_shortcut": "nin_shortcut"}
# ldm's q/k/v/proj_out are 1×1 convs ([C, C, 1, 1]); `load_into` reshapes them to the native Linear weights
LDM_ATTENTION_LEAVES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def ldm_keys(cfg: VAEConfig, prefix: str = LDM_PREFIX) -> dict[str, str]:
    """{native key: single-file key} for every parameter of `AutoencoderKL(cfg)` in the ldm layout; `prefix` is
    put before every key ("" for a standalone ldm VAE file). ldm numbers the decoder's levels from the lowest
    resolution's opposite end: native `decoder.up.{i}` (run order) is ldm `decoder.up.{last - i}`."""
    table: dict[str, str] = {}
    widths, n, last = cfg.block_out_channels, cfg.layers_per_block, len(cfg.block_out_channels) - 1
    p = prefix

    def resnet(native: str, ckpt: str, c_in: int, c_out: int) -> None:
        leaves = {k: v for k, v in LDM_RESNET_LEAVES.items() if k != "conv_shortcut" or c_in != c_out}
        _add(table, native, ckpt, leaves)

    def mid(part: str, width: int) -> None:
        resnet(f"{part}.mid.resnet1", f"{p}{part}.mid.block_1", width, width)
        if cfg.mid_block_add_attention:
            _add(table, f"{part}.mid.attn", f"{p}{part}.mid.attn_1", LDM_ATTENTION_LEAVES)
        resnet(f"{part}.mid.resnet2", f"{p}{part}.mid.block_2", width, width)

    _add(table, "encoder", f"{p}encoder", {"conv_in": "conv_in"})
    for i, w in enumerate(widths):
        for j in range(n):
            c_in = widths[max(i - 1, 0)] if j == 0 else w
            resnet(f"encoder.down.{i}.resnets.{j}", f"{p}encoder.down.{i}.block.{j}", c_in, w)
        if i < last:
            _add(table, f"encoder.down.{i}.resample", f"{p}encoder.down.{i}.downsample", {"conv": "conv"})
    mid("encoder", widths[-1])
    _add(table, "encoder", f"{p}encoder", {"conv_norm_out": "norm_out", "conv_out": "conv_out"})

    top = p.rstrip(".")  # `_add` joins a non-empty prefix with "."
    if cfg.use_quant_conv:
        _add(table, "", top, {"quant_conv": "quant_conv"})
    if cfg.use_post_quant_conv:
        _add(table, "", top, {"post_quant_conv": "post_quant_conv"})

    rwidths = widths[::-1]
    _add(table, "decoder", f"{p}decoder", {"conv_in": "conv_in"})
    mid("decoder", rwidths[0])
    for i, w in enumerate(rwidths):
        for j in range(n + 1):
            c_in = rwidths[max(i - 1, 0)] if j == 0 else w
            resnet(f"decoder.up.{i}.resnets.{j}", f"{p}decoder.up.{last - i}.block.{j}", c_in, w)
        if i < last:
            _add(table, f"decoder.up.{i}.resample", f"{p}decoder.up.{last - i}.upsample", {"conv": "conv"})
    _add(table, "decoder", f"{p}decoder", {"conv_norm_out": "norm_out", "conv_out": "conv_out"})
    return table


# ldm stores the mid-block attention projections as 1×1 convs ([C, C, 1, 1]); natively (and in diffusers) they
# are Linear weights ([C, C]). The two functions below reshape (a view) in each direction.
LDM_CONV_1X1 = frozenset(f"{part}.mid.attn.{leaf}.weight" for part in ("encoder", "decoder")
                         for leaf in ("to_q", "to_k", "to_v", "to_out"))


def ldm_to_native(native_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The native tensor from the ldm one `ldm_keys` names for it."""
    if native_key in LDM_CONV_1X1 and tensor.dim() == 4 and tuple(tensor.shape[2:]) == (1, 1):
        return tensor.reshape(tensor.shape[:2])
    return tensor


def native_to_ldm(native_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The ldm tensor from the native one: the inverse of `ldm_to_native`."""
    if native_key in LDM_CONV_1X1 and tensor.dim() == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    return tensor
