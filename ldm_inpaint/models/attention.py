"""Multi-head attention on (B, L, D) tensors, by default through PyTorch's fused scaled_dot_product_attention.

Every attention in the project (UNet self/cross-attention, the VAE's mid-block attention, the CLIP text
transformers) calls `attention` through this module at call time (`attn.attention(q, k, v, heads)`), so one
assignment swaps the implementation everywhere:

    from ldm_inpaint.models import attention as attn
    attn.attention = my_attention  # same signature as `fused_attention`
    with attn.use_attention(my_attention): ...  # or only inside a block
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    causal: bool = False) -> torch.Tensor:
    """softmax(q kᵀ / √d) v per head; q (B, Lq, D), k and v (B, Lk, D) → (B, Lq, D). With `causal`, query i
    attends to keys 0..i only."""
    q, k, v = (rearrange(t, "b l (heads d) -> b heads l d", heads=heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, heads, Lq, d)
    return rearrange(out, "b heads l d -> b l (heads d)")


attention: Callable[..., torch.Tensor] = fused_attention  # the implementation every model calls


@contextmanager
def use_attention(fn: Callable[..., torch.Tensor]) -> Iterator[Callable[..., torch.Tensor]]:
    """Make every model call `fn` instead of the current `attention` inside the `with` block."""
    global attention
    previous, attention = attention, fn
    try:
        yield fn
    finally:
        attention = previous
