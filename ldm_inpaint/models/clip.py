"""CLIP text transformers: OpenAI CLIP ViT-L/14 (SD 1.5, SDXL's first encoder) and OpenCLIP ViT-bigG/14 (SDXL's
second encoder, with its text projection). One class builds both; only the config differs.

References:
- Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision" (CLIP),
  arXiv:2103.00020: a pre-LayerNorm causal transformer over BPE tokens, read out at the end-of-text token.
- Cherti et al. 2023, "Reproducible scaling laws for contrastive language-image learning" (OpenCLIP),
  arXiv:2212.07143: the same text tower scaled to ViT-bigG/14 (width 1280, 32 layers), trained on LAION-2B.

Numerics and parameter names follow Hugging Face transformers 5.23 `CLIPTextModel` and
`CLIPTextModelWithProjection` (the layout of diffusers' `text_encoder/` and `text_encoder_2/` folders):
https://github.com/huggingface/transformers/blob/v5.23.0/src/transformers/models/clip/modeling_clip.py
Leaf modules carry the checkpoint's names; `weights_convert/clip.py` maps the containers
(`text_model.embeddings.`, `text_model.encoder.`) onto this flat layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ldm_inpaint.models import attention as attn

ACTIVATIONS = ("quick_gelu", "gelu")
# transformers' CLIPTextConfig before PR #24773 stored eos_token_id 2 (a placeholder, not the real 49407); such
# configs pool at input_ids.argmax(-1), which works because <|endoftext|> is the highest id in the vocabulary.
LEGACY_EOS_TOKEN_ID = 2


@dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of `CLIPTextModel`; the defaults are CLIP ViT-L/14 (SD 1.5's text encoder).
    Field names are those of transformers' `text_encoder/config.json`."""
    vocab_size: int = 49408
    hidden_size: int = 768  # width
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072  # MLP width
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # None: no text_projection (CLIPTextModel without projection)
    eos_token_id: int = LEGACY_EOS_TOKEN_ID  # selects the pooling rule, see `pool_positions`

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act: {self.hidden_act!r} is not supported (expected one of {ACTIVATIONS})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads: {self.num_attention_heads} does not divide "
                             f"hidden_size {self.hidden_size}")
        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                      "intermediate_size", "max_position_embeddings"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise ValueError(f"{field}: must be a positive int, got {getattr(self, field)!r}")
        if self.projection_dim is not None and (not isinstance(self.projection_dim, int) or self.projection_dim < 1):
            raise ValueError(f"projection_dim: must be a positive int or None, got {self.projection_dim!r}")
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ValueError(f"eos_token_id: must be one int, got {self.eos_token_id!r}")

    @classmethod
    def from_diffusers(cls, d: dict[str, Any], with_projection: bool = False) -> CLIPTextConfig:
        """The config of a transformers `CLIPTextModel` (`with_projection=False`, e.g. SD 1.5 `text_encoder/`)
        or `CLIPTextModelWithProjection` (`with_projection=True`, SDXL `text_encoder_2/`) `config.json`.
        A missing key takes transformers' `CLIPTextConfig` class default, as transformers would build the
        model; other keys (dropout, initializers, bos/pad ids, dtype, ...) do not change inference and are not
        read. `projection_dim` is read only with a projection: SD 1.5's config carries one although its
        CLIPTextModel has no projection layer. Raises ValueError naming the field for unsupported values."""
        if d.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(f"model_type: expected 'clip_text_model', got {d['model_type']!r}")
        projection_dim = None
        if with_projection:
            projection_dim = d.get("projection_dim", 512)
            if projection_dim is None:
                raise ValueError("projection_dim: a CLIPTextModelWithProjection needs one, got None")
        return cls(
            vocab_size=d.get("vocab_size", 49408),
            hidden_size=d.get("hidden_size", 512),
            num_hidden_layers=d.get("num_hidden_layers", 12),
            num_attention_heads=d.get("num_attention_heads", 8),
            intermediate_size=d.get("intermediate_size", 2048),
            max_position_embeddings=d.get("max_position_embeddings", 77),
            hidden_act=d.get("hidden_act", "quick_gelu"),
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
            projection_dim=projection_dim,
            eos_token_id=d.get("eos_token_id", 49407),
        )


VIT_L_14 = CLIPTextConfig()
VIT_BIGG_14 = CLIPTextConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                             intermediate_size=5120, hidden_act="gelu", projection_dim=1280)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI trained CLIP ViT-L/14 with this sigmoid approximation of GELU; the weights expect it, not exact GELU.
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention: token i attends to tokens 0..i, as in a language model."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = attn.attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)  # (B, L, D)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)
        # OpenCLIP ViT-bigG uses exact (erf) GELU, OpenAI ViT-L/14 QuickGELU
        self.act = quick_gelu if hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, hidden_act: str, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = CLIPMLP(width, mlp_width, hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return x


def pool_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B,) index of the token each sequence is read out at, as transformers 5.23 chooses it: with the legacy
    eos_token_id 2 the highest id (its first occurrence), else the first position holding eos_token_id
    (position 0 when there is none). For tokenizer output both give the first <|endoftext|>."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return input_ids.argmax(dim=-1)
    return (input_ids == eos_token_id).int().argmax(dim=-1)


class CLIPTextOutput(NamedTuple):
    hidden: torch.Tensor  # (B, L, D) hidden states of the requested layer
    pooled: torch.Tensor | None  # (B, projection_dim or D), or None when not requested


def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding(num, dim), initialised as it does (N(0, 1)) except on the meta device, where the loader
    builds models: there, normal_ imports torch._dynamo, 2 s of every pipeline load."""
    weight = torch.empty(num, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(num, dim, _weight=weight)


class CLIPTextModel(nn.Module):
    """The CLIP text transformer, optionally with OpenCLIP's text projection (`cfg.projection_dim`)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = _embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = _embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act,
                             cfg.layer_norm_eps) for _ in range(cfg.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.text_projection = (nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
                                if cfg.projection_dim is not None else None)

    def forward(self, input_ids: torch.Tensor, hidden_layer: int = -1, final_norm: bool = True,
                pooled: bool = False) -> CLIPTextOutput:
        """Encode token ids (B, L), L <= max_position_embeddings.

        Args:
            input_ids: (B, L) int64 token ids, e.g. from `ldm_inpaint.tokenizer.tokenize`.
            hidden_layer: which hidden state to return, indexed like transformers' `hidden_states` tuple:
                0 = the embeddings, i = the output of layer i, -1 = the last layer, -2 the penultimate.
                Layers after it are not computed unless `pooled` is requested.
            final_norm: apply `final_layer_norm` to the returned hidden state.
            pooled: also return the pooled embedding: final_layer_norm(last layer) at `pool_positions`,
                through `text_projection` when the model has one (SDXL's `text_embeds`). Runs every layer.

        Returns:
            CLIPTextOutput(hidden (B, L, D), pooled (B, P) or None). What the pipelines use:
            SD 1.5: `model(ids).hidden`; SD 1.5 with clip_skip k: `model(ids, hidden_layer=-(k + 1)).hidden`;
            SDXL: `model(ids, hidden_layer=-2, final_norm=False, pooled=True)` (pooled from text_encoder_2).
        """
        n = len(self.layers)
        if not -(n + 1) <= hidden_layer <= n:
            raise IndexError(f"hidden_layer {hidden_layer} out of range for {n} layers (valid: {-(n + 1)}..{n})")
        index = hidden_layer % (n + 1)  # number of layers to run for the requested hidden state
        B, L = input_ids.shape
        if L > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence length {L} exceeds max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")

        # positions are made here, not stored as a buffer, so a model built on the meta device needs only
        # its parameters from the checkpoint
        positions = torch.arange(L, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D)
        hidden = x
        for i, layer in enumerate(self.layers[: n if pooled else index]):
            x = layer(x)
            if i + 1 == index:
                hidden = x
        if final_norm:
            hidden = self.final_layer_norm(hidden)
        if not pooled:
            return CLIPTextOutput(hidden, None)

        last = self.final_layer_norm(x)  # (B, L, D)
        out = last[torch.arange(B, device=last.device), pool_positions(input_ids, self.cfg.eos_token_id)]  # (B, D)
        if self.text_projection is not None:
            out = self.text_projection(out)
        return CLIPTextOutput(hidden, out)
