"""The shared validation points: every user-supplied number, device and memory request is checked here, once,
with a one-line message that names the argument and says what to give instead.

Images, arrays and tensors are checked where they are read (image.py), output paths where they are written
(outputs.py), checkpoint tensors where they are loaded (weights_convert/common.py); all raise `InputError`
(or its subclass `CheckpointError`), which the command lines print as `error: …` with exit status 2.
"""

from __future__ import annotations

import math
import numbers
import os

import torch


class InputError(ValueError, TypeError):
    """Bad input. The message is one line saying what is wrong and what to do. A ValueError and a TypeError
    at once, so code that caught either before keeps working."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def number(value, name: str, *, integer: bool = False, low: float | None = None, high: float | None = None,
           low_open: bool = False):
    """`value` as a Python int (integer=True) or float, refused unless it is a real, finite number within
    [low, high] (or (low, high] with low_open). numpy and 0-d tensor scalars are accepted; bools and strings
    are not (True is not a step count, "0.5" is not a strength)."""
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a whole number" if integer else "a number"
        raise InputError(f"{name} must be {kind}, got {type(value).__name__} {_short(value)}")
    if integer:
        if not isinstance(value, numbers.Integral):
            raise InputError(f"{name} must be a whole number, got {value!r}")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise InputError(f"{name} must be {'>' if low_open else '≥'} {low}, got {value}")
    if high is not None and value > high:
        raise InputError(f"{name} must be ≤ {high}, got {value}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def device(spec: str | torch.device) -> torch.device:
    """A device this torch can run on, checked before anything is loaded: cpu, cuda[:i] (with a CUDA build
    and that many GPUs) or mps (Apple silicon)."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device {spec!r} is not a device name; give cpu, cuda, cuda:N or mps") from e
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build but no GPU is visible"
            raise InputError(f"device {spec!r}: this torch ({torch.__version__}) is {build}; use --device cpu, "
                             "or install a CUDA build of torch (README: GPU)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {spec!r}: only {torch.cuda.device_count()} GPU(s) visible (cuda:0 …)")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"device {spec!r}: MPS (Apple silicon) is not available here; use --device cpu")
        return dev
    raise InputError(f"device {spec!r} cannot run a pipeline; give cpu, cuda, cuda:N or mps")


# -- memory ---------------------------------------------------------------------------------------------------
# Bytes of activations per output pixel and image at the peak of a call: the VAE decoder's last blocks at full
# resolution (128-256 channels, a few live copies through GroupNorm and the convs) outweigh the UNet at 1/64 of
# the pixels. Measured, SD 1.5's VAE decoding one image (peak RSS above its weights): fp32 4.4 KB/px at 256²,
# 4.0 KB/px at 512²; bf16 2.6 and 1.1 KB/px.
BYTES_PER_PIXEL = {torch.float32: 4096, torch.bfloat16: 2048, torch.float16: 2048}
ENV_LIMIT = "LDM_INPAINT_MAX_MEMORY_GB"


def memory_limit() -> int:
    """Bytes a call may plan to use: $LDM_INPAINT_MAX_MEMORY_GB when set, else the memory available now
    (MemAvailable on Linux, else all physical memory)."""
    override = os.environ.get(ENV_LIMIT)
    if override:
        try:
            return int(number(float(override), ENV_LIMIT, low=0, low_open=True) * 2**30)
        except ValueError as e:
            raise InputError(f"{ENV_LIMIT}={override!r} must be a number of GiB") from e
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_needed(height: int, width: int, images: int, dtype: torch.dtype = torch.float32,
                  weights_bytes: int = 0) -> int:
    """An estimate of a call's peak bytes: the weights plus the decoder's activations at height × width.
    Images are decoded together, so the batch multiplies it."""
    return weights_bytes + images * height * width * BYTES_PER_PIXEL.get(dtype, 4096)


def check_memory(height: int, width: int, images: int, dtype: torch.dtype = torch.float32,
                 weights_bytes: int = 0, limit: int | None = None) -> None:
    """Refuse, before anything is loaded or allocated, a call that cannot fit in memory."""
    need = memory_needed(height, width, images, dtype, weights_bytes)
    limit = memory_limit() if limit is None else limit
    if need > limit:
        raise InputError(f"{images} image(s) of {width}x{height} need about {need / 2**30:.1f} GiB, more than the "
                         f"{limit / 2**30:.1f} GiB available; use a smaller size or fewer images (--crop-to-mask "
                         f"inpaints only around the mask), or raise the limit with {ENV_LIMIT}")


def tensor(value, name: str, dims: str | None = None) -> torch.Tensor:
    """A floating-point tensor with only finite values, and as many dimensions as `dims` names ("(B, 4, h, w)"):
    latents and embeddings a caller passes in."""
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if dims is not None and value.ndim != dims.count(",") + 1:
        raise InputError(f"{name} must be {dims}, got shape {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise InputError(f"{name} holds NaN or infinite values")
    return value


def size_pair(value, name: str) -> tuple[int, int] | None:
    """None, or a (height, width) / (top, left) pair of whole numbers ≥ 0."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InputError(f"{name} must be a pair (height, width) or (top, left), got {_short(value)}")
    return tuple(number(v, name, integer=True, low=0) for v in value)
