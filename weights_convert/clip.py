"""Key tables for the CLIP text encoders (`ldm_inpaint.models.clip.CLIPTextModel`).

`diffusers_keys(cfg, prefix)` maps every native parameter to its name in a transformers `CLIPTextModel` /
`CLIPTextModelWithProjection` file, the layout of diffusers' `text_encoder/` and `text_encoder_2/` folders.
The text tower sits under `text_model.` in files saved by transformers 4.x (every official SD 1.5 / SDXL file)
and by `CLIPTextModelWithProjection`; transformers >= 5.6 saves a plain `CLIPTextModel` without it.
`text_projection.weight` never has the prefix. `diffusers_prefix(tensors)` tells which form a file uses:

    tensors = read_tensors(path)
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    load_into(model, tensors, diffusers_keys(cfg, diffusers_prefix(tensors)), what="text encoder",
              ignore=DIFFUSERS_IGNORE)

Leaf names inside a layer (`LAYER_LEAVES`) are a table of their own, so another layout (OpenCLIP's own, with a
fused attention in_proj) can add its function next to this one with its own prefixes and leaves.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ldm_inpaint.models.clip import CLIPTextConfig
from weights_convert.common import CheckpointError

TEXT_MODEL_PREFIX = "text_model."

# native leaf → transformers leaf inside one encoder layer; each has a weight and a bias
LAYER_LEAVES = {
    "layer_norm1": "layer_norm1",
    "self_attn.q_proj": "self_attn.q_proj",
    "self_attn.k_proj": "self_attn.k_proj",
    "self_attn.v_proj": "self_attn.v_proj",
    "self_attn.out_proj": "self_attn.out_proj",
    "layer_norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}

# older transformers releases saved the constant position_ids buffer (arange(77)); positions are recomputed
# in `CLIPTextModel.forward`, so it is accepted and not loaded.
DIFFUSERS_IGNORE = (f"{TEXT_MODEL_PREFIX}embeddings.position_ids", "embeddings.position_ids")


def diffusers_prefix(keys: Iterable[str]) -> str:
    """`TEXT_MODEL_PREFIX` if the checkpoint's keys (a state dict or its keys) use it, else "". A file mixing
    both forms gets the prefix, and the strict loader then names the keys it cannot use."""
    return TEXT_MODEL_PREFIX if any(k.startswith(TEXT_MODEL_PREFIX) for k in keys) else ""


def diffusers_keys(cfg: CLIPTextConfig, prefix: str = TEXT_MODEL_PREFIX) -> dict[str, str]:
    """{native key: transformers key} for every parameter of `CLIPTextModel(cfg)`; `prefix` is put before
    every text-tower key ("text_model." or "", see `diffusers_prefix`)."""
    table = {
        "token_embedding.weight": f"{prefix}embeddings.token_embedding.weight",
        "position_embedding.weight": f"{prefix}embeddings.position_embedding.weight",
    }
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in LAYER_LEAVES.items():
            for p in ("weight", "bias"):
                table[f"layers.{i}.{ours}.{p}"] = f"{prefix}encoder.layers.{i}.{theirs}.{p}"
    for p in ("weight", "bias"):
        table[f"final_layer_norm.{p}"] = f"{prefix}final_layer_norm.{p}"
    if cfg.projection_dim is not None:
        # a sibling of text_model in CLIPTextModelWithProjection, hence never prefixed
        table["text_projection.weight"] = "text_projection.weight"
    return table


# --- Single-file layouts ---
# CLIP ViT-L/14 in ldm (SD 1.x) and sgm (SDXL's first embedder) files is a transformers CLIPTextModel state dict
# under a prefix, so its table is the transformers one with that prefix.
LDM_PREFIX = "cond_stage_model.transformer."
SGM_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."


def ldm_keys(cfg: CLIPTextConfig, prefix: str = LDM_PREFIX) -> dict[str, str]:
    """{native key: single-file key} for CLIP ViT-L/14 (no projection) stored as transformers' `CLIPTextModel`
    under `prefix`. The `embeddings.position_ids` buffer of older transformers may sit beside it: ignore
    `prefix + DIFFUSERS_IGNORE[0]`."""
    if cfg.projection_dim is not None:
        raise ValueError("the ldm/sgm CLIP ViT-L/14 has no text projection")
    return diffusers_keys(cfg, prefix + TEXT_MODEL_PREFIX)


# OpenCLIP ViT-bigG/14's text tower (sgm `FrozenOpenCLIPEmbedder2`, `conditioner.embedders.1.model.`) keeps
# open_clip's own names: `nn.MultiheadAttention` with q, k, v stacked in one `in_proj` (rows [q; k; v]), a bare
# `positional_embedding` Parameter, and `text_projection` stored for `x @ P` (a Linear weight is P.T).
OPENCLIP_PREFIX = "conditioner.embedders.1.model."
OPENCLIP_LAYER_LEAVES = {
    "layer_norm1": "ln_1",
    "self_attn.q_proj": "attn.in_proj",
    "self_attn.k_proj": "attn.in_proj",
    "self_attn.v_proj": "attn.in_proj",
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
# the transforms: which third of the fused in_proj each native projection is, and the one transposed tensor
OPENCLIP_QKV_PART = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
OPENCLIP_TRANSPOSED = "text_projection.weight"
# unused by the text tower (CLIP's contrastive temperature)
OPENCLIP_IGNORE = ("logit_scale",)


def openclip_keys(cfg: CLIPTextConfig, prefix: str = OPENCLIP_PREFIX) -> dict[str, str]:
    """{native key: OpenCLIP key} for every parameter of `CLIPTextModel(cfg)` (with projection). The three
    native q/k/v projections of a layer share one fused key; `openclip_to_native` cuts out each one's part."""
    if cfg.projection_dim is None:
        raise ValueError("OpenCLIP's text tower has a text projection: build the config with with_projection=True")
    table = {
        "token_embedding.weight": f"{prefix}token_embedding.weight",
        "position_embedding.weight": f"{prefix}positional_embedding",
    }
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in OPENCLIP_LAYER_LEAVES.items():
            for p in ("weight", "bias"):
                # nn.MultiheadAttention names its fused projection in_proj_weight / in_proj_bias
                sep = "_" if theirs == "attn.in_proj" else "."
                table[f"layers.{i}.{ours}.{p}"] = f"{prefix}transformer.resblocks.{i}.{theirs}{sep}{p}"
    for p in ("weight", "bias"):
        table[f"final_layer_norm.{p}"] = f"{prefix}ln_final.{p}"
    table[OPENCLIP_TRANSPOSED] = f"{prefix}text_projection"
    return table


def _layer_leaf(native_key: str) -> str:
    """`self_attn.q_proj` for `layers.3.self_attn.q_proj.weight`."""
    parts = native_key.rsplit(".", 1)[0].split(".", 2)
    return parts[2] if parts[0] == "layers" and len(parts) == 3 else ""


def openclip_to_native(native_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The native tensor `native_key` from the OpenCLIP tensor `openclip_keys` names for it: a third of the
    fused in_proj for q/k/v (a view), the transposed text projection, else the tensor itself."""
    if tensor.dim() == 0:  # left to the shape check, which names it
        return tensor
    if native_key == OPENCLIP_TRANSPOSED:
        return tensor.T.contiguous() if tensor.dim() == 2 else tensor
    part = OPENCLIP_QKV_PART.get(_layer_leaf(native_key))
    if part is not None:
        if tensor.shape[0] % 3:
            raise CheckpointError(f"OpenCLIP in_proj of shape {tuple(tensor.shape)} cannot be split in q, k, v")
        return tensor.chunk(3, dim=0)[part]
    return tensor


def native_to_openclip(table: dict[str, str], native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The OpenCLIP tensors from native ones (`table` from `openclip_keys`): q, k, v stacked into in_proj,
    the text projection transposed back; the inverse of `openclip_to_native`."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list] = {}
    for key, tensor in native.items():
        part = OPENCLIP_QKV_PART.get(_layer_leaf(key))
        if part is not None:
            fused.setdefault(table[key], [None] * 3)[part] = tensor
        elif key == OPENCLIP_TRANSPOSED:
            out[table[key]] = tensor.T.contiguous()
        else:
            out[table[key]] = tensor
    for name, parts in fused.items():
        if any(p is None for p in parts):
            raise CheckpointError(f"cannot build {name}: q, k and v are not all given")
        out[name] = torch.cat(parts, dim=0)
    return out
