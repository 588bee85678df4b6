"""Gaussian noise drawn exactly as diffusers' `randn_tensor` draws it, so that a seed means the same image."""

from __future__ import annotations

from typing import Sequence, Union

import torch

Generator = Union[torch.Generator, Sequence[torch.Generator], None]


def randn(shape: Sequence[int], generator: Generator, device: torch.device | str,
          dtype: torch.dtype) -> torch.Tensor:
    """N(0, 1) of `shape`, drawn on the generator's device directly in `dtype` (an fp16 draw is not an fp32
    draw cast to fp16), then moved to `device`; a list of generators draws one (1, ...) slice per batch item."""
    if isinstance(generator, (list, tuple)) and len(generator) == 1:  # diffusers treats it as a lone generator
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: give one per image")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    draw_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)
