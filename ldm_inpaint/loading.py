"""Building a pipeline from a diffusers-layout folder, a hub repo id, or an original single-file checkpoint.

Each component is created on the meta device from its diffusers config, then filled once from its tensors
through the explicit key table in `weights_convert/` — strictly: a missing, extra or misshapen tensor is an
error naming it, never a silently random weight. Single files (CompVis `ldm` / Stability `sgm` layouts) are
first renamed to the diffusers keys by `weights_convert.single_file`, so both paths share the same loader.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

import weights_convert.clip as clip_keys
import weights_convert.single_file as single_file
import weights_convert.unet as unet_keys
import weights_convert.vae as vae_keys
from weights_convert.common import CheckpointError, load_into
from weights_convert.single_file import TOKENIZER_PADS, model_config, packaged_tokenizer_warning

from .family import SD15, SDXL
from .hub import CHECKPOINT_SUFFIXES, resolve
from .models.clip import CLIPTextModel
from .models.unet import UNet
from .models.vae import AutoencoderKL
from .pipeline import Pipeline
from .tokenizer import CLIPTokenizer, load_tokenizer


DEMO_MODEL = os.path.join(os.path.dirname(__file__), "demo", "model")  # load_pipeline("demo")


def _build(model_cls, cfg, tensors, key_map, what, dtype, device, ignore=()) -> nn.Module:
    with torch.device("meta"):
        model = model_cls(cfg)
    model = load_into(model, tensors, key_map, what=what, ignore=ignore, dtype=dtype, device=device).eval()
    if dtype in (torch.bfloat16, torch.float16):
        # Half-precision convolutions run channels-last without oneDNN reordering every activation: 8 % faster
        # for the UNet, 18-20 % for the VAE (bf16, 512², CPU). fp32 keeps diffusers' layouts and so its exact
        # results (channels-last moves the VAE's output by 7e-5).
        model = model.to(memory_format=torch.channels_last)
    return model


def build_unet(config: dict, tensors: Mapping[str, torch.Tensor], dtype, device) -> UNet:
    cfg = model_config("unet", config)
    return _build(UNet, cfg, tensors, unet_keys.diffusers_keys(cfg), "UNet", dtype, device)


def build_vae(config: dict, tensors: Mapping[str, torch.Tensor], dtype, device) -> AutoencoderKL:
    cfg = model_config("vae", config)
    tensors = vae_keys.rename_legacy_attention(tensors)
    return _build(AutoencoderKL, cfg, tensors, vae_keys.diffusers_keys(cfg), "VAE", dtype, device)


def build_text_encoder(config: dict, tensors: Mapping[str, torch.Tensor], dtype, device,
                       component: str = "text_encoder") -> CLIPTextModel:
    # SDXL's second encoder (OpenCLIP ViT-bigG) carries the projection that makes its pooled output
    cfg = model_config(component, config)
    key_map = clip_keys.diffusers_keys(cfg, clip_keys.diffusers_prefix(tensors))
    return _build(CLIPTextModel, cfg, tensors, key_map, component.replace("_", " "), dtype, device,
                  ignore=clip_keys.DIFFUSERS_IGNORE)


def _tokenizers(folder: str | None, names) -> dict:
    """The folder's tokenizers, or — for a single file, which holds none, or a folder lacking one, with a
    warning — ones made from the CLIP BPE vocabulary that ships with the package (the same for CLIP ViT-L and
    OpenCLIP ViT-bigG)."""
    out = {}
    for name in names:
        path = None if folder is None else os.path.join(folder, name)
        if path is not None and os.path.isdir(path):
            try:
                out[name] = load_tokenizer(path)
            except (ValueError, KeyError, TypeError, OSError) as e:  # the folder's files, not our code
                raise CheckpointError(f"{path}: not a usable CLIP tokenizer folder ({type(e).__name__}: {e})") from e
            continue
        if folder is not None:
            packaged_tokenizer_warning(folder, name)
        out[name] = CLIPTokenizer.from_packaged(TOKENIZER_PADS[name])
    return out


def load_pipeline(model: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  revision: str | None = None, cache_dir: str | None = None, local_files_only: bool = False,
                  variant: str | None = None, config: str | os.PathLike | None = None,
                  use_ema: bool = False) -> Pipeline:
    """A ready pipeline from a diffusers-layout folder, a hub repo id or a single checkpoint file.

    Args:
        model: a folder, a repo id (`owner/name[@revision]`, e.g. "stable-diffusion-v1-5/stable-diffusion-inpainting"),
            or a `.safetensors` / `.ckpt` file in the original CompVis or Stability layout (SD 1.x, SD 1.x
            inpainting, SDXL base, SDXL inpainting; the family is detected from the keys and shapes), or "demo":
            the small inpainting model trained by this package and shipped with it (docs/training.md).
        dtype: weights and compute dtype (torch.float32, torch.bfloat16, torch.float16).
        device: where the models run.
        revision, cache_dir, local_files_only: as in huggingface_hub, for repo ids.
        variant: weight files of a variant, e.g. "fp16" for `model.fp16.safetensors` (folders and repo ids).
        config: single files only: a diffusers folder (or repo id) whose configs and tokenizers to use instead
            of the official ones of the detected family, as diffusers' `from_single_file(config=...)`.
        use_ema: single files only: load the UNet's EMA weights (`model_ema.*`) where the file has them.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    if os.fspath(model) == "demo":
        model = DEMO_MODEL
    if os.path.isfile(model) and os.fspath(model).endswith(CHECKPOINT_SUFFIXES):
        config_folder = None if config is None else resolve(config, **hub)
        sf = single_file.read(model, config=config_folder, ema=use_ema)
        configs, tensors, index, tokenizer_folder = sf.configs, sf.tensors, sf.model_index, config_folder
    elif config is not None or use_ema:
        raise ValueError("config= and use_ema= apply to single-file checkpoints only")
    else:
        folder = resolve(model, variant=variant, **hub)
        configs, tensors = single_file.read_folder(folder, variant)
        index, tokenizer_folder = single_file.read_model_index(Path(folder, "model_index.json")), folder

    family = SDXL if "text_encoder_2" in configs else SD15
    if family.zero_negatives:  # a repo may turn SDXL's zero negative embeddings off in model_index.json
        family = dataclasses.replace(family, zero_negatives=index.get("force_zeros_for_empty_prompt", True))
    # the SDXL 1.0 VAE overflows in half precision (its config says force_upcast); diffusers upcasts it for
    # every encode and decode, here it is simply loaded in fp32 once
    upcast = family.vae_upcast and model_config("vae", configs["vae"]).force_upcast
    two = family.text_encoders == 2
    tokenizers = _tokenizers(tokenizer_folder, ("tokenizer", "tokenizer_2") if two else ("tokenizer",))
    return Pipeline(
        unet=build_unet(configs["unet"], tensors["unet"], dtype, device),
        vae=build_vae(configs["vae"], tensors["vae"], torch.float32 if upcast else dtype, device),
        text_encoder=build_text_encoder(configs["text_encoder"], tensors["text_encoder"], dtype, device),
        tokenizer=tokenizers["tokenizer"],
        text_encoder_2=(build_text_encoder(configs["text_encoder_2"], tensors["text_encoder_2"], dtype, device,
                                           "text_encoder_2") if two else None),
        tokenizer_2=tokenizers.get("tokenizer_2"),
        family=family,
        scheduler_config=configs["scheduler"],
        name=os.path.basename(os.path.normpath(os.fspath(model))),
        configs={"model_index": index, **configs},
        tokenizer_folder=tokenizer_folder,
    )
