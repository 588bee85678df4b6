"""Multi-head attention on (B, L, D) tensors through PyTorch's fused scaled_dot_product_attention.

Every attention in the project (UNet self/cross-attention, the VAE's mid-block attention, the CLIP text
transformer) goes through `attention`, so the head layout and the kernel choice live in one place.
"""

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              causal: bool = False) -> torch.Tensor:
    """softmax(q kᵀ / √d) v per head; q (B, Lq, D), k and v (B, Lk, D) → (B, Lq, D)."""
    B, Lq, D = q.shape
    Lk = k.shape[1]
    d = D // heads
    q = q.view(B, Lq, heads, d).transpose(1, 2)  # (B, heads, Lq, d)
    k = k.view(B, Lk, heads, d).transpose(1, 2)  # (B, heads, Lk, d)
    v = v.view(B, Lk, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, heads, Lq, d)
    return out.transpose(1, 2).reshape(B, Lq, D)
