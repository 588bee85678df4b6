"""A Pipeline's weights written as a diffusers-layout folder, through the same key tables that load it, so
`diffusers.DiffusionPipeline.from_pretrained` and `ldm_inpaint.load_pipeline` both read the result."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import weights_convert.clip as clip_keys
import weights_convert.unet as unet_keys
import weights_convert.vae as vae_keys
from weights_convert.common import WEIGHT_FILES
from weights_convert.single_file import TOKENIZER_PADS

from ..pipeline import Pipeline
from ..tokenizer import write_tokenizer_folder


def component_tensors(pipe: Pipeline) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {diffusers key: tensor}} of the pipeline's models (native key → diffusers key tables)."""
    out = {"unet": _renamed(pipe.unet, unet_keys.diffusers_keys(pipe.unet.cfg)),
           "vae": _renamed(pipe.vae, vae_keys.diffusers_keys(pipe.vae.cfg)),
           "text_encoder": _renamed(pipe.text_encoder, clip_keys.diffusers_keys(pipe.text_encoder.cfg))}
    if pipe.text_encoder_2 is not None:
        out["text_encoder_2"] = _renamed(pipe.text_encoder_2, clip_keys.diffusers_keys(pipe.text_encoder_2.cfg))
    return out


def _renamed(model: torch.nn.Module, table: dict[str, str]) -> dict[str, torch.Tensor]:
    return {table[k]: v.detach().contiguous() for k, v in model.state_dict().items()}


def save_folder(pipe: Pipeline, configs: dict[str, dict], folder: str | os.PathLike,
                tokenizers_from: str | os.PathLike | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `folder` (replaced atomically if it exists): model_index.json, scheduler/, each model's config.json
    and weights (in `dtype`, default as they are), tokenizer folders (copied from `tokenizers_from`, or the
    packaged CLIP vocabulary). `configs` holds "model_index", "scheduler" and each component's config dict."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _write_json(tmp / "model_index.json", configs["model_index"])
        _write_json(tmp / "scheduler" / "scheduler_config.json", configs["scheduler"])
        for component, tensors in component_tensors(pipe).items():
            _write_json(tmp / component / "config.json", configs[component])
            if dtype is not None:
                tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
            save_file(tensors, tmp / component / WEIGHT_FILES[component][0], metadata={"format": "pt"})
        for name, pad in TOKENIZER_PADS.items():
            if name == "tokenizer_2" and pipe.text_encoder_2 is None:
                continue
            source = Path(tokenizers_from, name) if tokenizers_from is not None else None
            if source is not None and source.is_dir():
                shutil.copytree(source, tmp / name)
            else:
                write_tokenizer_folder(tmp / name, pad_token=pad)
        if folder.exists():  # replace: the old one goes only once the new one is complete
            old = folder.with_name(f".{folder.name}.old")
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
