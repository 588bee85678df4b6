"""Key tables from checkpoint layouts onto the native UNet (`ldm_inpaint.models.unet`).

Each layout walks the levels of the same `UNetConfig` that builds the model and names, for every native
parameter, the checkpoint tensor that fills it. Leaf names inside ResBlocks and transformers are shared by
the native model and diffusers except for the few renames in `_DIFFUSERS_TRANSFORMER_LEAVES`.
"""

from __future__ import annotations

from ldm_inpaint.models.unet import UNetConfig

# Native leaf → diffusers leaf inside one transformer block; diffusers wraps to_out and the feed-forward in
# Sequentials whose other members (dropout, GELU gate) hold no parameters.
_DIFFUSERS_TRANSFORMER_LEAVES = {
    "norm1": "norm1", "norm2": "norm2", "norm3": "norm3",
    "attn1.to_q": "attn1.to_q", "attn1.to_k": "attn1.to_k", "attn1.to_v": "attn1.to_v",
    "attn1.to_out": "attn1.to_out.0",
    "attn2.to_q": "attn2.to_q", "attn2.to_k": "attn2.to_k", "attn2.to_v": "attn2.to_v",
    "attn2.to_out": "attn2.to_out.0",
    "ff.proj": "ff.net.0.proj", "ff.out": "ff.net.2",
}
_NO_BIAS = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v"}


def _weight_bias(native: str, ckpt: str, bias: bool = True) -> dict[str, str]:
    keys = {f"{native}.weight": f"{ckpt}.weight"}
    if bias:
        keys[f"{native}.bias"] = f"{ckpt}.bias"
    return keys


def _diffusers_resnet(native: str, ckpt: str, shortcut: bool) -> dict[str, str]:
    keys = {}
    for leaf in ("norm1", "conv1", "time_emb_proj", "norm2", "conv2") + (("conv_shortcut",) if shortcut else ()):
        keys |= _weight_bias(f"{native}.{leaf}", f"{ckpt}.{leaf}")
    return keys


def _diffusers_transformer(native: str, ckpt: str, depth: int) -> dict[str, str]:
    keys = {}
    for leaf in ("norm", "proj_in", "proj_out"):
        keys |= _weight_bias(f"{native}.{leaf}", f"{ckpt}.{leaf}")
    for k in range(depth):
        for ours, theirs in _DIFFUSERS_TRANSFORMER_LEAVES.items():
            keys |= _weight_bias(f"{native}.transformer_blocks.{k}.{ours}",
                                 f"{ckpt}.transformer_blocks.{k}.{theirs}", bias=ours not in _NO_BIAS)
    return keys


def diffusers_keys(cfg: UNetConfig) -> dict[str, str]:
    """{native key: diffusers `unet/diffusion_pytorch_model.safetensors` key} for every UNet parameter."""
    channels, L = cfg.block_out_channels, cfg.layers_per_block
    n = len(channels)
    keys = {}
    for leaf in ("time_embedding.linear_1", "time_embedding.linear_2", "conv_in", "conv_norm_out", "conv_out"):
        keys |= _weight_bias(leaf, leaf)
    if cfg.add_embed_in_dim is not None:
        for leaf in ("add_embedding.linear_1", "add_embedding.linear_2"):
            keys |= _weight_bias(leaf, leaf)

    for i in range(n):
        block = f"down_blocks.{i}"
        for j in range(L):
            # Only a level's first ResBlock can change the channel count.
            shortcut = j == 0 and i > 0 and channels[i - 1] != channels[i]
            keys |= _diffusers_resnet(f"{block}.resnets.{j}", f"{block}.resnets.{j}", shortcut)
            if cfg.cross_attention_levels[i]:
                keys |= _diffusers_transformer(f"{block}.attentions.{j}", f"{block}.attentions.{j}",
                                               cfg.transformer_layers_per_block[i])
        if i < n - 1:
            keys |= _weight_bias(f"{block}.downsample", f"{block}.downsamplers.0.conv")

    keys |= _diffusers_resnet("mid_block.resnet_1", "mid_block.resnets.0", shortcut=False)
    keys |= _diffusers_transformer("mid_block.attention", "mid_block.attentions.0",
                                   cfg.transformer_layers_per_block[-1])
    keys |= _diffusers_resnet("mid_block.resnet_2", "mid_block.resnets.1", shortcut=False)

    for u, level in enumerate(reversed(range(n))):
        block = f"up_blocks.{u}"
        for j in range(L + 1):
            # The concatenated skip always makes the input wider than the output.
            keys |= _diffusers_resnet(f"{block}.resnets.{j}", f"{block}.resnets.{j}", shortcut=True)
            if cfg.cross_attention_levels[level]:
                keys |= _diffusers_transformer(f"{block}.attentions.{j}", f"{block}.attentions.{j}",
                                               cfg.transformer_layers_per_block[level])
        if level > 0:
            keys |= _weight_bias(f"{block}.upsample", f"{block}.upsamplers.0.conv")
    return keys


# --- CompVis `ldm` / Stability `sgm` single-file layout (openaimodel.UNetModel under `model.diffusion_model.`) ---
# The levels are flattened into numbered `input_blocks` / `output_blocks` Sequentials: a ResBlock at `.0`, its
# transformer at `.1`, a resampler at `.0.op` (down) or after the last member (up).

LDM_PREFIX = "model.diffusion_model."
# native ResBlock leaf → openaimodel ResBlock leaf; the Sequentials' other members (SiLU, dropout) hold nothing
LDM_RESNET_LEAVES = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
# the ldm SpatialTransformer's inside carries diffusers' names (`_DIFFUSERS_TRANSFORMER_LEAVES`)
LDM_TRANSFORMER_LEAVES = _DIFFUSERS_TRANSFORMER_LEAVES


def _ldm_resnet(native: str, ckpt: str, shortcut: bool) -> dict[str, str]:
    keys = {}
    for ours, theirs in LDM_RESNET_LEAVES.items():
        if ours != "conv_shortcut" or shortcut:
            keys |= _weight_bias(f"{native}.{ours}", f"{ckpt}.{theirs}")
    return keys


def ldm_keys(cfg: UNetConfig, prefix: str = LDM_PREFIX) -> dict[str, str]:
    """{native key: single-file key} for every UNet parameter, in the CompVis `ldm` (SD 1.x) and Stability `sgm`
    (SDXL) layouts, which name the UNet alike; `prefix` is put before every key."""
    channels, L = cfg.block_out_channels, cfg.layers_per_block
    n = len(channels)
    keys = {}
    for ours, theirs in (("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
                         ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")):
        keys |= _weight_bias(ours, prefix + theirs)
    if cfg.add_embed_in_dim is not None:  # SDXL's micro-conditioning MLP (sgm `label_emb`)
        keys |= _weight_bias("add_embedding.linear_1", f"{prefix}label_emb.0.0")
        keys |= _weight_bias("add_embedding.linear_2", f"{prefix}label_emb.0.2")

    for i in range(n):
        first = 1 + i * (L + 1)  # input_blocks.0 is conv_in; each level holds L blocks plus its downsampler
        for j in range(L):
            block = f"{prefix}input_blocks.{first + j}"
            shortcut = j == 0 and i > 0 and channels[i - 1] != channels[i]
            keys |= _ldm_resnet(f"down_blocks.{i}.resnets.{j}", f"{block}.0", shortcut)
            if cfg.cross_attention_levels[i]:
                keys |= _diffusers_transformer(f"down_blocks.{i}.attentions.{j}", f"{block}.1",
                                               cfg.transformer_layers_per_block[i])
        if i < n - 1:
            keys |= _weight_bias(f"down_blocks.{i}.downsample", f"{prefix}input_blocks.{first + L}.0.op")

    keys |= _ldm_resnet("mid_block.resnet_1", f"{prefix}middle_block.0", shortcut=False)
    keys |= _diffusers_transformer("mid_block.attention", f"{prefix}middle_block.1",
                                   cfg.transformer_layers_per_block[-1])
    keys |= _ldm_resnet("mid_block.resnet_2", f"{prefix}middle_block.2", shortcut=False)

    for u, level in enumerate(reversed(range(n))):
        cross = cfg.cross_attention_levels[level]
        for j in range(L + 1):
            block = f"{prefix}output_blocks.{u * (L + 1) + j}"
            keys |= _ldm_resnet(f"up_blocks.{u}.resnets.{j}", f"{block}.0", shortcut=True)
            if cross:
                keys |= _diffusers_transformer(f"up_blocks.{u}.attentions.{j}", f"{block}.1",
                                               cfg.transformer_layers_per_block[level])
        if level > 0:  # the upsampler follows the level's last ResBlock (and its transformer, if any)
            block = f"{prefix}output_blocks.{u * (L + 1) + L}"
            keys |= _weight_bias(f"up_blocks.{u}.upsample", f"{block}.{2 if cross else 1}.conv")
    return keys


def ldm_ema_key(key: str) -> str:
    """The name of the EMA shadow of one single-file UNet key: ldm's `LitEma` registers one buffer per parameter
    of the `model` wrapper, named by deleting every "." (`model.diffusion_model.out.0.weight` →
    `model_ema.diffusion_modelout0weight`)."""
    if not key.startswith(LDM_PREFIX):
        raise ValueError(f"{key} is not under {LDM_PREFIX}")
    return "model_ema." + key[len("model."):].replace(".", "")
