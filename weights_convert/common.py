"""Reading checkpoint files and loading them strictly into native modules through a key table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

import torch
from torch import nn

from ldm_inpaint.checks import InputError
from ldm_inpaint.memory import drop_file_pages

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # Python ≥ 3.11; annotations only


class CheckpointError(InputError):
    """A checkpoint that does not fit the model; the message says what to do."""


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def read_json(path: Path | Traversable) -> dict:
    """A JSON object file: a component's config.json, model_index.json, scheduler_config.json, a shard index.
    The one reader of checkpoint JSON: a missing, unreadable or malformed file, or one holding anything but
    an object, is a CheckpointError naming the file and what is wrong with it."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                              f"is it complete? fix or re-download it") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds {_JSON_TYPES.get(type(obj), type(obj).__name__)}, expected a JSON "
                              f"object {{\"key\": value, …}}")
    return obj


def _is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"  # a zip's first local file header: torch.save since torch 1.6


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file (memory-mapped) or a pickled `.bin`/`.ckpt` (weights only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors import SafetensorError
            from safetensors.torch import load_file
            try:
                return load_file(path)
            except SafetensorError as e:  # truncated, empty, or not a safetensors file at all
                raise CheckpointError(f"{path}: not a readable .safetensors file ({e}); is it complete?") from e
        # the legacy (pre-1.6, non-zip) torch.save format cannot be memory-mapped: it is read into memory
        mmap = _is_zip(path)
        try:
            # weights_only: a pickle can run code when unpickled; this refuses anything but tensors and containers.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # noqa: BLE001 - any unpickling failure gets the same advice
            legacy = "" if mmap else " (a legacy pre-1.6 torch.save file, or not a PyTorch file)"
            raise CheckpointError(
                f"{path}: cannot be read as a weights-only PyTorch checkpoint{legacy} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); convert it to .safetensors") from e
    except OSError as e:  # unreadable: permissions, an I/O error
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from e
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


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
            for shard in _shards(index):
                tensors.update(read_tensors(shard))
            return tensors
    raise CheckpointError(f"{Path(folder, component)}: no weights file ({' or '.join(WEIGHT_FILES[component])}"
                          f"{f', variant {variant}' if variant else ''})")


def _shards(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's `.index.json` names in its `weight_map` ({tensor: file}): plain
    file names beside the index, never a path elsewhere (`../../x`, `/abs/x`)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no \"weight_map\" object ({{tensor name: shard file}})")
    shards = set(weight_map.values())
    for shard in shards:
        if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
            raise CheckpointError(f"{index}: weight_map names shard {shard!r}, not a file name in {index.parent}; "
                                  f"shards must lie beside their index")
    return [index.parent / shard for shard in sorted(shards)]


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
        if param.is_floating_point() and not tensors[src].is_floating_point():
            problems.append(f"{src} holds {tensors[src].dtype} values where a floating-point weight belongs")
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
