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
