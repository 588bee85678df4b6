"""Cross-attention maps per prompt token: where in the picture the UNet looks at each word of the prompt.

While a `CrossAttentionMaps` is active, every cross-attention of the UNet (the `attn2` of each TransformerBlock)
also computes its attention probabilities softmax(q kᵀ / √d) over the 77 text positions, averages them over heads,
resizes them to the latent grid and accumulates them. Their mean over layers and UNet calls is the per-token heat
map of DAAM (Tang et al. 2023, "What the DAAM: Interpreting Stable Diffusion Using Cross Attention",
arXiv:2210.04885) and prompt-to-prompt (Hertz et al. 2022, arXiv:2208.01626); a mean, and a bilinear resize, so
that at every pixel the maps stay a distribution over the text positions. The probabilities are recomputed in
forward hooks from the module's own `to_q`/`to_k`: the fused attention and the UNet output are unchanged, and
nothing extra runs when no recorder is active.

    with CrossAttentionMaps(pipe.unet, (h, w)) as recorder:
        ...  # sample
    maps = recorder.maps()  # (N, 77, h, w); with guidance the conditional half is maps[N // 2:]
    save_token_maps(maps[-1], image, token_labels(pipe.tokenizer, prompt), "maps/")
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from ldm_inpaint.outputs import save_png
from ldm_inpaint.models.unet import Attention, SpatialTransformer, UNet
from ldm_inpaint.tokenizer import CLIPTokenizer

# The "jet" colormap as piecewise-linear ramps: dark blue → blue → cyan → yellow → red → dark red.
_JET_AT = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_JET_RGB = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]])


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q kᵀ / √d) per head, in float32; q (B, Lq, D), k (B, Lk, D) → (B, heads, Lq, Lk)."""
    q, k = (rearrange(t.float(), "b l (heads d) -> b heads l d", heads=heads) for t in (q, k))
    return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)


class CrossAttentionMaps:
    """Context manager: while active, every cross-attention of `unet` also computes its attention probabilities,
    averaged over heads and resized to `size` (the latent (h, w)), and accumulates them; the fused attention
    itself still runs and the UNet output is unchanged. Entering starts a new recording."""

    def __init__(self, unet: UNet, size: tuple[int, int]):
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"size must be the latent (height, width) as two positive ints, got {size!r}")
        self.unet, self.size = unet, tuple(size)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._sum: torch.Tensor | None = None  # (N, L, h, w): the sum of the maps of every layer and call
        self._count = 0

    def __enter__(self) -> CrossAttentionMaps:
        if self._handles:
            raise RuntimeError("this CrossAttentionMaps is already recording; exit it before entering it again")
        transformers = [m for m in self.unet.modules() if isinstance(m, SpatialTransformer)]
        if not transformers:
            raise ValueError("this UNet has no cross-attention (no SpatialTransformer) to record")
        self._sum, self._count = None, 0
        for transformer in transformers:
            self._watch(transformer)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _watch(self, transformer: SpatialTransformer) -> None:
        """Hook the cross-attentions of one transformer; a pre-hook notes the (H, W) of the feature map whose
        flattened grid are the attention's query tokens (for odd latent sides it is not size / 2^level)."""
        grid = []

        def note_grid(module, args):
            grid[:] = args[0].shape[-2:]

        def record(attention, args, output):
            x, context = args
            self._add(attention, x, context, *grid)

        self._handles.append(transformer.register_forward_pre_hook(note_grid))
        self._handles += [block.attn2.register_forward_hook(record) for block in transformer.transformer_blocks]

    @torch.no_grad()
    def _add(self, attention: Attention, x: torch.Tensor, context: torch.Tensor, H: int, W: int) -> None:
        probs = attention_probs(attention.to_q(x), attention.to_k(context), attention.heads)  # (N, heads, H·W, L)
        probs = rearrange(probs.mean(dim=1), "n (h w) l -> n l h w", h=H, w=W)
        # bilinear weights sum to 1, so every pixel's values still sum to 1 over the L positions
        probs = F.interpolate(probs, size=self.size, mode="bilinear", align_corners=False)  # (N, L, *size)
        if self._sum is None:
            self._sum = torch.zeros_like(probs)
        elif self._sum.shape != probs.shape:
            raise ValueError(f"the UNet batch or text length changed while recording ({tuple(self._sum.shape[:2])} "
                             f"→ {tuple(probs.shape[:2])}); record one sampling run per `with` block")
        self._sum += probs
        self._count += 1

    def maps(self) -> torch.Tensor:
        """(N, L, h, w) float32 on the UNet's device: the mean over heads, cross-attention layers and UNet calls;
        at every pixel the L values sum to 1. N is the UNet batch (with guidance 2B, unconditional half first)."""
        if self._sum is None:
            raise RuntimeError("no cross-attention ran while recording: call the UNet inside the `with` block")
        return self._sum / self._count


def token_labels(tokenizer: CLIPTokenizer, prompt: str) -> list[str]:
    """The text of each token of `prompt` at the positions the UNet's context holds it: labels[i] is position
    i + 1 (position 0 is BOS; EOS and padding follow the last label). Cut to 75 tokens, as `tokenize` cuts."""
    ids = tokenizer.encode(prompt)[1:-1][: tokenizer.model_max_length - 2]
    return [tokenizer.decode([i]) for i in ids]


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1], any shape (...) → (..., 3) RGB in [0, 1] on the jet colormap."""
    return np.stack([np.interp(values, _JET_AT, _JET_RGB[:, c]) for c in range(3)], axis=-1)


def save_token_maps(maps: torch.Tensor, image: Image.Image, labels: list[str],
                    folder: str | os.PathLike) -> list[Path]:
    """Write one PNG per prompt token, `NN_token.png` (NN its position, e.g. `01_red.png`): its map scaled to
    [0, 1] by its own maximum, resized to the image, as a heat overlay blended 50/50 with the image.

    Args:
        maps: (L, h, w) maps of one image, e.g. `CrossAttentionMaps.maps()[i]`.
        image: the picture to overlay (any size).
        labels: `token_labels(tokenizer, prompt)`: the text of positions 1, 2, ….
        folder: created if missing.
    Returns:
        The paths written, in position order.
    """
    if maps.ndim != 3 or maps.shape[0] <= len(labels):
        raise ValueError(f"maps must be (L, h, w) for one image with L > {len(labels)} (one per label, after BOS), "
                         f"got {tuple(maps.shape)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = image.size
    heat = F.interpolate(maps[1:len(labels) + 1, None].detach().float().cpu(), size=(height, width),
                         mode="bilinear", align_corners=False)[:, 0]  # (tokens, H, W)
    heat = heat / heat.amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(heat.dtype).tiny)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    paths = []
    for position, (label, m) in enumerate(zip(labels, heat), start=1):
        overlay = 0.5 * base + 0.5 * 255 * heat_colors(m.numpy())
        path = folder / f"{position:02d}_{_filename_safe(label)}.png"
        save_png(Image.fromarray(overlay.round().clip(0, 255).astype(np.uint8)), path)
        paths.append(path)
    return paths


def _filename_safe(label: str) -> str:
    """Letters, digits, '-' and '_' of a token's text; 'token' for a token with none (punctuation)."""
    return re.sub(r"[^\w-]+", "_", label).strip("_")[:40] or "token"
