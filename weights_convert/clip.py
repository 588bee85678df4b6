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

from ldm_inpaint.models.clip import CLIPTextConfig

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
