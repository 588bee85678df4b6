"""Reading checkpoint files and loading them strictly into native modules through a key table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from ldm_inpaint.checks import InputError
from ldm_inpaint.memory import drop_file_pages


class CheckpointError(InputError):
    """A checkpoint that does not fit the model; the message says what to do."""


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file (memory-mapped) or a pickled `.bin`/`.ckpt` (weights only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except SafetensorError as e:  # truncated, empty, or not a safetensors file at all
            raise CheckpointError(f"{path}: not a readable .safetensors file ({e}); is it complete?") from e
    try:
        # weights_only: a pickle can run code when unpickled; this refuses anything but tensors and containers.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure gets the same advice
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only PyTorch checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); convert it to .safetensors") from e
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


# weight file of each component of a diffusers-layout folder, in order of preference (safetensors first)
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
    "text_encoder_2": ("model.safetensors", "pytorch_model.bin"),
}


def read_component(folder: str | os.PathLike, component: str, variant: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of one component of a diffusers folder: a single file, or the shards of its `.index.json`;
    `variant` ("fp16") reads `model.fp16.safetensors`-style files."""
    for name in WEIGHT_FILES[component]:
        if variant:
            stem, ext = name.rsplit(".", 1)
            name = f"{stem}.{variant}.{ext}"
        path = Path(folder, component, name)
        if path.is_file():
            return read_tensors(path)
        index = Path(f"{path}.index.json")
        if index.is_file():
            tensors = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                tensors.update(read_tensors(Path(folder, component, shard)))
            return tensors
    raise CheckpointError(f"{Path(folder, component)}: no weights file ({' or '.join(WEIGHT_FILES[component])}"
                          f"{f', variant {variant}' if variant else ''})")


def _fit(native_shape: torch.Size, tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor in the native shape, or None. The only reshape allowed is a 1×1 conv ↔ linear weight
    ([out, in, 1, 1] ↔ [out, in]): the same matrix, stored either way by different releases."""
    if tensor.shape == native_shape:
        return tensor
    squeeze = lambda s: tuple(s[:2]) if len(s) == 4 and tuple(s[2:]) == (1, 1) else tuple(s)  # noqa: E731
    if squeeze(native_shape) == squeeze(tensor.shape) and len(squeeze(native_shape)) == 2:
        return tensor.reshape(native_shape)
    return None


def load_into(model: nn.Module, tensors: Mapping[str, torch.Tensor], key_map: Mapping[str, str], *,
              what: str, ignore: Iterable[str] = (), dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu") -> nn.Module:
    """Fill every parameter of `model` (typically built on the meta device) from `tensors` via `key_map`
    ({native key: checkpoint key}), strictly: a missing key, an unused checkpoint key that is not in
    `ignore`, or a shape mismatch raises CheckpointError naming them. Tensors are cast to `dtype` (floating
    point ones only) and moved to `device` once, and assigned without a second copy."""
    native = dict(model.state_dict(keep_vars=True))
    problems = []
    unknown_native = sorted(set(key_map) - set(native))
    if unknown_native:  # a bug in the table, not in the checkpoint
        raise KeyError(f"{what}: key table names parameters the model lacks: {unknown_native[:5]}")
    unmapped = sorted(set(native) - set(key_map))
    if unmapped:
        raise KeyError(f"{what}: key table leaves parameters unmapped: {unmapped[:5]}")
    missing = sorted(k for k in native if key_map[k] not in tensors)
    if missing:
        problems.append(f"missing {len(missing)} key(s) e.g. {[key_map[k] for k in missing[:5]]}")
    ignore = set(ignore)
    used = set(key_map.values())
    unexpected = sorted(k for k in tensors if k not in used and k not in ignore)
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s) e.g. {unexpected[:5]}")
    state = {}
    for k, param in native.items():
        src = key_map[k]
        if src not in tensors:
            continue
        t = _fit(param.shape, tensors[src])
        if t is None:
            problems.append(f"shape mismatch at {src}: checkpoint {tuple(tensors[src].shape)}, "
                            f"model {tuple(param.shape)}")
            continue
        # no copy when the file already holds the dtype: the parameter is the memory-mapped tensor itself
        # (loading SD 1.5's 3.4 GB UNet takes 0.2 s instead of ~9 s of copying; measured no slower to run)
        state[k] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
        if state[k].data_ptr() != t.data_ptr():
            # the file pages just read for the copy: without this they stay resident until the file is
            # closed, and loading SD 1.5 in bf16 peaked at 6.3 GiB for 2 GiB of weights
            drop_file_pages([t])
    if problems:
        raise CheckpointError(f"{what} checkpoint does not match its config: " + "; ".join(problems[:4])
                              + " (is this the right file for this model and config?)")
    model.load_state_dict(state, strict=True, assign=True)
    return model
