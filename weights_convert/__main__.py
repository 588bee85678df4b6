"""Convert between original single-file checkpoints and diffusers-layout folders.

    python -m weights_convert sd-v1-5-inpainting.ckpt sd15-inpainting/          # single file → folder
    python -m weights_convert sd_xl_base_1.0.safetensors sdxl/ --dtype fp16
    python -m weights_convert sd15-inpainting/ sd15-inpainting.safetensors     # folder → single file

A folder written here loads with `diffusers.DiffusionPipeline.from_pretrained` and with `ldm_inpaint`; a single
file written here loads with diffusers' `from_single_file`. Outputs are written next to DST under a temporary
name and renamed at the end, so a failed or interrupted run (an error, a full disk, Ctrl-C, SIGTERM) leaves
nothing behind. Errors print one line and exit with 2; an interruption prints "interrupted" and exits with 130.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Mapping

try:  # most of the start-up time (torch): Ctrl-C here is one line too, not the import machinery's traceback
    import torch

    from ldm_inpaint.checks import InputError
    from ldm_inpaint.family import family_of_config, variant
    from ldm_inpaint.outputs import handle_sigterm
    from ldm_inpaint.tokenizer import write_tokenizer_folder
    from weights_convert import single_file
    from weights_convert.common import WEIGHT_FILES, CheckpointError
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    print("interrupted", file=sys.stderr)
    sys.exit(130)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# model_index entries of components this converter does not write (a single file holds none of them)
NOT_WRITTEN = ("safety_checker", "feature_extractor", "image_encoder")


def _save(tensors: Mapping[str, torch.Tensor], path: Path, dtype: torch.dtype | None) -> None:
    """safetensors needs contiguous tensors that own their storage: views (OpenCLIP's q/k/v thirds) are copied."""
    from safetensors.torch import save_file

    out = {}
    for k, t in tensors.items():
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        t = t.contiguous()
        if t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()
        out[k] = t
    save_file(out, str(path), metadata={"format": "pt"})


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_folder(sf: single_file.SingleFile, dst: Path, dtype: torch.dtype | None,
                 tokenizers_from: Path | None = None) -> None:
    """A diffusers-layout folder at `dst` (which must not exist): model_index.json, one folder per component
    with its config.json and weights, scheduler/, tokenizer/[, tokenizer_2/] (copied from `tokenizers_from`
    when it has them, else written from the bundled CLIP vocabulary)."""
    index = dict(sf.model_index)
    index["_class_name"] = variant(sf.family).pipeline
    for name in NOT_WRITTEN:
        if name in index:
            index[name] = [None, None]
    if family_of_config(sf.family).text_encoders == 1:
        index["requires_safety_checker"] = False
    index["scheduler"] = ["diffusers", sf.configs["scheduler"]["_class_name"]]
    _write_json(dst / "model_index.json", index)
    _write_json(dst / "scheduler" / "scheduler_config.json", sf.configs["scheduler"])
    for component, tensors in sf.tensors.items():
        _write_json(dst / component / "config.json", sf.configs[component])
        _save(tensors, dst / component / WEIGHT_FILES[component][0], dtype)
    for name, pad in single_file.TOKENIZER_PADS.items():
        if name == "tokenizer_2" and "text_encoder_2" not in sf.tensors:
            continue
        if tokenizers_from is not None and (tokenizers_from / name).is_dir():
            shutil.copytree(tokenizers_from / name, dst / name)
        else:
            if tokenizers_from is not None:
                single_file.packaged_tokenizer_warning(tokenizers_from, name)
            write_tokenizer_folder(dst / name, pad_token=pad)


def _atomic(dst: Path, write) -> None:
    """Run `write(tmp)` on a temporary path beside `dst`, then rename it to `dst`. The temporary is removed on
    any error, Ctrl-C or SIGTERM (see `main`); a failed write (a full disk) is one line naming `dst`."""
    if dst.exists():
        raise CheckpointError(f"{dst} already exists; choose a new destination")
    from safetensors import SafetensorError

    tmp = None
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
        if dst.suffix == ".safetensors":
            write(tmp / dst.name)
            os.replace(tmp / dst.name, dst)
        else:
            write(tmp / "out")
            os.rename(tmp / "out", dst)
    except (OSError, SafetensorError) as e:
        raise InputError(f"cannot write {dst}: {_write_failure(e)}") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_failure(e: Exception) -> str:
    """What went wrong writing, and what to do. safetensors reports OS errors inside its own message
    ("… I/O error: No space left on device (os error 28)")."""
    code = getattr(e, "errno", None)
    if code is None and (m := re.search(r"\(os error (\d+)\)", str(e))):
        code = int(m[1])
    if code == errno.ENOSPC:
        return "no space left on device; free some space or choose a destination on another disk"
    reason = os.strerror(code) if code else str(e)
    return f"{reason[:1].lower()}{reason[1:]}; choose another destination"


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None, ema: bool = False,
            config: str | os.PathLike | None = None) -> str:
    """Convert `src` to `dst` (see the module docstring); returns a one-line summary."""
    src, dst = Path(src), Path(dst)
    torch_dtype = DTYPES[dtype] if dtype is not None else None
    if src.is_dir():
        if dst.suffix != ".safetensors":
            raise CheckpointError(f"{src} is a folder: DST must be a single .safetensors file, got {dst}")
        if ema or config is not None:
            raise CheckpointError("--ema and --config apply to single-file sources only")
        configs, tensors = single_file.read_folder(src)
        out = single_file.join(configs, tensors)
        _atomic(dst, lambda path: _save(out, path, torch_dtype))
        return f"wrote {dst} ({len(out)} tensors, {'SDXL' if 'text_encoder_2' in configs else 'SD 1.x'} layout)"
    if not src.is_file():
        raise CheckpointError(f"{src} not found")
    if dst.suffix in (".safetensors", ".ckpt"):
        raise CheckpointError(f"{src} is a single file: DST must be a folder, got {dst}")
    sf = single_file.read(src, config=config, ema=ema)
    _atomic(dst, lambda path: write_folder(sf, path, torch_dtype, Path(config) if config is not None else None))
    return f"wrote {dst} ({sf.family}{', EMA weights' if sf.ema else ''})"


def main(argv: list[str] | None = None) -> int:
    handle_sigterm()  # SIGTERM unwinds like Ctrl-C, so the temporary output is removed
    parser = argparse.ArgumentParser(
        prog="python -m weights_convert", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Convert an original single-file SD 1.x / SDXL checkpoint (.safetensors or .ckpt, CompVis ldm / "
                    "Stability sgm layout) to a diffusers-layout folder, or a folder to a single .safetensors.")
    parser.add_argument("src", help="single checkpoint file, or a diffusers-layout folder")
    parser.add_argument("dst", help="output folder, or output .safetensors file when SRC is a folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="store floating-point weights in this dtype (default: as stored in SRC)")
    parser.add_argument("--ema", action="store_true", help="take the UNet's EMA weights (model_ema.*)")
    parser.add_argument("--config", default=None,
                        help="diffusers-layout folder whose configs (and tokenizers) to use; default: the official "
                             "configs of the detected model family")
    args = parser.parse_args(argv)
    try:
        print(convert(args.src, args.dst, dtype=args.dtype, ema=args.ema, config=args.config))
    except (ValueError, OSError) as e:  # InputError and CheckpointError are ValueErrors
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (outputs.Terminated)
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
